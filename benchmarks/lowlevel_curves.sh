#!/usr/bin/env bash
# Low-level BIT vs MindEye2-style vs ridge on one store: the three fits side by side, then the val curves
# per epoch and benchmarks/lowlevel_scores.py on the best-val-loss checkpoints (issue #4; RESULTS.md).
#
#   CLUSTERS=runs/demo/v2c_functional/clusters.npz benchmarks/lowlevel_curves.sh OUT
#   env: STORE (default: simulate the demo preset into $W), CLUSTERS (required), EPOCHS [40], ACCEL [gpu],
#        LIMIT seconds per fit [1800], NW data workers [3], W work folder [/tmp/lowlevel_curves], PYTHON [python3]
set -u
OUT=${1:?usage: lowlevel_curves.sh OUT}; mkdir -p "$OUT"
: "${CLUSTERS:?set CLUSTERS to the V2C clusters.npz of the store}"
ACCEL=${ACCEL:-gpu}; EPOCHS=${EPOCHS:-40}; LIMIT=${LIMIT:-1800}; NW=${NW:-3}; W=${W:-/tmp/lowlevel_curves}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}; B="$PY -m brainit_pl.cli"
if [ -z "${STORE:-}" ]; then
  STORE=$W/store
  $B simulate --out $W/nsd --preset demo --no-preview --overwrite >/dev/null 2>&1 &&
    $B prepare --nsd-root $W/nsd --out $STORE --overwrite >/dev/null 2>&1 || { echo "simulation failed"; exit 1; }
fi
fit() { # name config extra...
  local name=$1 cfg=$2; shift 2
  rm -rf "$W/runs/$name"
  timeout "$LIMIT" $B fit --config "$cfg" --data.store "$STORE" --trainer.accelerator "$ACCEL" \
    --data.num_workers "$NW" --trainer.default_root_dir "$W/runs/$name" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $?"
}
fit ridge configs/sim/ridge_lowlevel.yaml &
fit bit configs/sim/bit_lowlevel.yaml --model.init_args.clusters "$CLUSTERS" --trainer.max_epochs "$EPOCHS" &
fit mindeye2 configs/sim/mindeye2_lowlevel.yaml --trainer.max_epochs "$EPOCHS" &
wait
$PY - "$W/runs" <<'PYEOF' | tee "$OUT/curves.txt"
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in ("bit", "mindeye2", "ridge"):
    for path in sorted(glob.glob(f"{sys.argv[1]}/{run}/**/events*", recursive=True)):
        events = EventAccumulator(path); events.Reload()
        for tag in ("val/loss", "val/vgg_2way"):
            if tag in events.Tags()["scalars"]:
                print(f"{run} {tag}: " + " ".join(f"{e.value:.3f}" for e in events.Scalars(tag)))
PYEOF
args=()
for name in bit mindeye2; do
  best=$(ls "$W/runs/$name"/lightning_logs/version_0/checkpoints/epoch=*.ckpt 2>/dev/null | head -1)
  [ -n "$best" ] && args+=("$name=$best")
done
$PY benchmarks/lowlevel_scores.py --store "$STORE" "${args[@]}" 2>&1 | grep -v -i warn | tee "$OUT/scores.txt"
