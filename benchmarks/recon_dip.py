"""DIP inversion speed: seconds per image, all images in one batched run vs one image at a time.

Both modes run :func:`~brainit_pl.recon.dip.invert_vgg_tokens` on the same targets in the same process
(``batch=N`` vs ``batch=1``; the results are the same images, see ``tests/test_dip.py``). The networks
have the real shapes: the 224² "skip" DIP (32 → 128 channels, 3 scales) and VGG16-BN at 112² — the tiny
twin by default, which has the real architecture, so the cost is the real one (``--weights`` loads a
VGG16-BN file instead). Targets are the tokens of random images. A 1-step run of each mode first warms
up (lazy initialisation, cuDNN autotuning) and is not timed. The per-image time at the method's 1,800
steps is extrapolated from ``--steps``.

usage:
  python benchmarks/recon_dip.py --quick                      # CPU smoke run (2 images, 2 steps)
  python benchmarks/recon_dip.py --images 8 --steps 5         # CPU
  python benchmarks/recon_dip.py --device cuda --images 8 --steps 50
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from brainit_pl.backbones.vgg import VGGTokens, build_vgg
from brainit_pl.devices import resolve_device
from brainit_pl.recon.dip import invert_vgg_tokens

PAPER_STEPS = 1800


def timed(tokens: torch.Tensor, vgg_tokens: VGGTokens, steps: int, batch: int) -> tuple[float, float, float]:
    """Wall seconds and CPU seconds of one inversion of all ``tokens`` in chunks of ``batch``, and its peak
    GPU GiB. The CPU time (this process, all threads) is the steadier figure on a shared machine."""
    device = tokens.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    invert_vgg_tokens(tokens, vgg_tokens, steps=steps, batch=batch, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, cpu_seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="images inverted [8]")
    parser.add_argument("--steps", type=int, default=5, help="Adam steps per image [5]")
    parser.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    parser.add_argument("--weights", default=None, help="a VGG16-BN weight file [the tiny twin]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    parser.add_argument("--quick", action="store_true", help="2 images, 2 steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, steps = (2, 2) if args.quick else (args.images, args.steps)
    device = resolve_device(args.device)

    vgg_tokens = VGGTokens(build_vgg(args.weights, tiny=args.weights is None)).to(device)
    with torch.no_grad():
        pictures = torch.rand(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        tokens = vgg_tokens(pictures.to(device))  # (N, 7190, 512)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {device} ({where}); {images} images × {steps} steps, "
        "224² DIP, VGG16-BN at 112²"
    )

    for batch in (images, 1):  # warm-up: one step in each mode
        invert_vgg_tokens(tokens[:batch], vgg_tokens, steps=1, batch=batch, progress=False)
    rows = {}
    for name, batch in (("batched", images), ("one at a time", 1)):
        seconds, cpu_seconds, peak = timed(tokens, vgg_tokens, steps, batch)
        per_step = seconds / images / steps  # wall s per image and step
        rows[name] = (seconds, cpu_seconds)
        print(
            f"{name:>14}: {seconds / images:8.3f} s/image for {steps} steps "
            f"({per_step * 1e3:7.1f} ms/image/step, CPU {cpu_seconds / images / steps * 1e3:7.1f} ms), "
            f"≈{per_step * PAPER_STEPS / 60:6.1f} min/image at {PAPER_STEPS} steps"
            + ("" if math.isnan(peak) else f", peak {peak:.2f} GiB")
        )
    (wall_b, cpu_b), (wall_1, cpu_1) = rows["batched"], rows["one at a time"]
    print(f"speed-up of batching: {wall_1 / wall_b:.2f}× wall, {cpu_1 / cpu_b:.2f}× CPU time")


if __name__ == "__main__":
    main()
