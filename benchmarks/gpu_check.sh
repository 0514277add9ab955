#!/usr/bin/env bash
# The GPU checks in one run (a lent GPU machine, or any CUDA box with the stack installed).
#
#   bash benchmarks/gpu_check.sh OUTDIR        # each part's log in OUTDIR/<part>.log
#
# Parts, each under its own time limit so that one failure does not cost the others:
# (in this order: bit, stage2, unclip, lightning, dip, pytest — the most wanted figures first)
#   lightning  the simulated tiny NSD → brainit-pl fit of the semantic and the low-level BIT on the GPU with
#              bf16-mixed (the CLI path, Lightning's GPU accelerator, AMP), 2 epochs each
#   pytest     the tests with a CUDA variant (-m "not slow", CUDA-only ones included)
#   bit        benchmarks/bit.py: batch 8 (all variants) and the paper's batches (128 semantic, 64 low-level)
#   dip        benchmarks/recon_dip.py: batched vs one-at-a-time DIP inversion, s/image at 1,800 steps
#   unclip     benchmarks/recon.py --real: the 2.5 B unCLIP UNet's sampling, s/image
#   stage2     benchmarks/stage2.py: stage-2 training step at the real shapes, s/step and peak memory
# On the lent machine (torch, lightning, transformers... preinstalled) the project's other packages travel as
# wheels: diffusers, open_clip_torch, ftfy, wcwidth, omegaconf, jsonargparse, docstring_parser,
# typeshed_client, nilearn, nibabel (pip download --no-deps ... -d .whl, then pip install --target). Elsewhere
# install the project first (make install) and run with PYTHON=.venv/bin/python.
set -u
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BRAINIT="$PY -m brainit_pl.cli"
WORK=${WORK:-/tmp/brainit-gpu}
ACCEL=${ACCEL:-gpu} DEVICE=${DEVICE:-cuda} PRECISION=${PRECISION:-bf16-mixed}  # a CPU dry run: ACCEL=cpu DEVICE=cpu PRECISION=32-true
ONLY=${ONLY:-}  # run only the parts named here (space-separated)
rm -rf "$WORK" && mkdir -p "$WORK"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, report the status
    local name=$1 limit=$2; shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local start=$SECONDS
    timeout "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log"
}

[ "$ACCEL" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

part bit 170 "$PY benchmarks/bit.py --device cuda --batch 8 --steps 5 --warmup 2 && \
  $PY benchmarks/bit.py --device cuda --batch 128 --presets semantic --steps 5 --warmup 2 && \
  $PY benchmarks/bit.py --device cuda --batch 64 --presets lowlevel --steps 5 --warmup 2"
part stage2 110 "$PY benchmarks/stage2.py --device cuda --batch 8 --steps 3 --warmup 1"
part unclip 90 "$PY benchmarks/recon.py --real --device cuda --images 2"
part lightning 100 "
set -e
$BRAINIT simulate --out $WORK/nsd --preset tiny --no-preview
$BRAINIT prepare --nsd-root $WORK/nsd --out $WORK/store
$BRAINIT extract-features --store $WORK/store --tiny --device $DEVICE
$BRAINIT cluster --store $WORK/store --out $WORK/clusters --kind anatomical --clusters 4 --no-plots
for branch in semantic lowlevel; do
  extra=''
  if [ \$branch = lowlevel ]; then
    extra='--model.init_args.branch lowlevel --model.init_args.tiny_vgg true --model.init_args.target_shape null --model.init_args.tokens_per_scale [8,8,4,4,2] --data.features [] --data.image_sizes [112]'
  fi
  $BRAINIT fit --config configs/sim/bit_tiny.yaml --data.store $WORK/store \
    --model.init_args.clusters $WORK/clusters/clusters.npz --trainer.accelerator $ACCEL --trainer.devices 1 \
    --trainer.precision $PRECISION --trainer.default_root_dir $WORK/runs/\$branch \$extra
  ls -R $WORK/runs/\$branch | grep -c ckpt
done
"
part dip 50 "$PY benchmarks/recon_dip.py --device cuda --images 8 --steps 30"
part pytest 60 "$PY -m pytest -q -x -p no:cacheprovider -k cuda tests/"
