"""BIT vs the baselines on held-out feature prediction, and functional vs anatomical V2C clusters.

Runs the feature-model steps of ``brainit-pl demo`` (:mod:`brainit_pl.workflows.demo`: CLIP cache, encoder, V2C,
synthetic fMRI, then for each branch the BIT on functional clusters, the BIT on anatomical clusters, the
MindEye2-style baseline and ridge, trained on the same data and targets and tested on the shared images;
each step skipped when done) and prints the table from its ``summary.json``:

* ``clip_cos``: mean token cosine of predicted vs true CLIP tokens;
* ``clip_2way`` / ``vgg_2way``: two-way identification on predicted vs true CLIP / VGG tokens;

val at the best-validation-loss epoch, test on the shared images (which no training stage sees).

usage:
  python benchmarks/bit_vs_baselines.py                                  # the demo store, ~45 min on 2 cores
  python benchmarks/bit_vs_baselines.py --store demo/store --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROWS = ("bit", "bit_anatomical", "mindeye2_baseline", "ridge_baseline")
COLUMNS = (("semantic", "clip_cos"), ("semantic", "clip_2way"), ("lowlevel", "vgg_2way"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=Path("demo/store"))
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--semantic-epochs", type=int, default=10, help="[10, as make demo]")
    parser.add_argument(
        "--lowlevel-epochs", type=int, default=20,
        help="[20; make demo trains 5, too few for the low-level BIT to pass ridge on this store]",
    )  # fmt: skip
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "brainit_pl.cli", "demo", "--store", str(args.store), "--out", str(args.out),
           "--anatomical-bit", "--no-reconstruct", "--semantic-epochs", str(args.semantic_epochs),
           "--lowlevel-epochs", str(args.lowlevel_epochs)]  # fmt: skip
    subprocess.run(cmd, check=True)
    summary = json.loads((args.out / "report" / "summary.json").read_text())
    head = " | ".join(f"val {name} | test {name}" for _, name in COLUMNS)
    lines = [f"| model | {head} |", "|---|" + "---|---|" * len(COLUMNS)]
    for row in ROWS:
        values = summary.get(row, {})
        cells = []
        for branch, name in COLUMNS:
            val = values.get(f"{branch}_val_{name.split('_')[1]}")
            test = values.get(f"{branch}_test_{name}")
            cells += [f"{v:.3f}" if isinstance(v, float) else "—" for v in (val, test)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    v2c = summary.get("v2c", {})
    lines.append("")
    lines.append(f"V2C ARI vs true voxel types (K={v2c.get('k')}): functional {v2c.get('ari_functional')}, "
                 f"anatomical {v2c.get('ari_anatomical')}")  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
