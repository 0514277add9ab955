"""Seconds to build each tiny backbone twin (the tests and the demo build them often; target: under a second).

The VGG twin calibrates its BatchNorm statistics on pink noise at every build (``brainit_pl.backbones.vgg``),
so it is the slowest. Prints the median and the range of ``--repeats`` builds per twin, one torch thread.

usage:
  python benchmarks/backbones.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from brainit_pl.backbones.clip import build_clip
from brainit_pl.backbones.dinov2 import build_dinov2
from brainit_pl.backbones.vgg import build_vgg

FACTORIES = {
    "clip": lambda: build_clip(tiny=True),
    "vgg": lambda: build_vgg(None, tiny=True),
    "dinov2": lambda: build_dinov2(tiny=True),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, build in FACTORIES.items():
        build()  # imports and first-call costs
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            build()
            seconds.append(time.perf_counter() - start)
        print(
            f"{name:7s} median {statistics.median(seconds):.3f} s  (min {min(seconds):.3f}, max {max(seconds):.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
