"""BIT vs the baselines on held-out feature prediction, and functional vs anatomical V2C clusters.

Runs the feature-model steps of ``brainit-pl demo`` (:mod:`brainit_pl.workflows.demo`: CLIP cache, encoder, V2C,
synthetic fMRI, then for each branch the BIT on functional clusters, the BIT on anatomical clusters, the
MindEye2-style baseline and ridge, trained on the same data and targets and tested on the shared images;
each step skipped when done) and prints the table from its ``summary.json``:

* ``clip_cos``: mean token cosine of predicted vs true CLIP tokens;
* ``clip_2way`` / ``vgg_2way``: two-way identification on predicted vs true CLIP / VGG tokens;

val at the best-validation-loss epoch, test on the shared images (which no training stage sees), with its 95 %
bootstrap interval over test images; then the BIT against each baseline on the same test images: the paired
difference (BIT − baseline), its 95 % interval and the verdict (better / worse / tie when the interval holds 0),
from the runs' per-image ``test_scores.csv``. ``--results PATH`` also writes these numbers as JSON.

usage:
  python benchmarks/bit_vs_baselines.py                                  # the demo store, ~45 min on 2 cores
  python benchmarks/bit_vs_baselines.py --store demo/store --out runs/demo --results runs/demo/results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROWS = ("bit", "bit_anatomical", "mindeye2_baseline", "ridge_baseline")
COLUMNS = (("semantic", "clip_cos"), ("semantic", "clip_2way"), ("lowlevel", "vgg_2way"))


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "—"


def _test_cell(values: dict, branch: str, name: str) -> str:
    """The test value with its 95 % interval over test images, when the summary has one."""
    ci = values.get(f"{branch}_test_{name}_ci")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return _number(values.get(f"{branch}_test_{name}")) + interval


def table(summary: dict) -> list[str]:
    """The markdown table of the summary's models (test with its interval), the BIT's paired comparisons
    with each baseline (difference BIT − baseline, its 95 % interval, verdict), and the V2C agreement."""
    head = " | ".join(f"val {name} | test {name} [95% CI]" for _, name in COLUMNS)
    lines = [f"| model | {head} |", "|---|" + "---|---|" * len(COLUMNS)]
    for row in ROWS:
        values = summary.get(row, {})
        cells = []
        for branch, name in COLUMNS:
            cells += [
                _number(values.get(f"{branch}_val_{name.split('_')[1]}")),
                _test_cell(values, branch, name),
            ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    comparisons = summary.get("comparisons", {})
    if comparisons:
        lines += ["", "| test metric | comparison | difference | 95% CI | verdict |", "|---|---|---|---|---|"]
        for metric, pairs in comparisons.items():
            for pair, c in pairs.items():
                ci = f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
                lines.append(f"| {metric} | {pair} | {c['diff']:+.3f} | {ci} | {c['verdict']} |")
    v2c = summary.get("v2c", {})
    lines.append("")
    lines.append(f"V2C ARI vs true voxel types (K={v2c.get('k')}): functional {v2c.get('ari_functional')}, "
                 f"anatomical {v2c.get('ari_anatomical')}")  # fmt: skip
    return lines


def results(summary: dict) -> dict:
    """The table's numbers as JSON: per model its val/test values and test intervals, and the comparisons."""
    models = {
        row: {k: v for k, v in summary[row].items() if k.split("_")[0] in ("semantic", "lowlevel")}
        for row in ROWS
        if row in summary
    }
    return {"models": models, "comparisons": summary.get("comparisons", {}), "v2c": summary.get("v2c", {})}


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
    parser.add_argument(
        "--results", type=Path, help="also write the numbers as JSON (e.g. results.json) here"
    )
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "brainit_pl.cli", "demo", "--store", str(args.store), "--out", str(args.out),
           "--anatomical-bit", "--no-reconstruct", "--semantic-epochs", str(args.semantic_epochs),
           "--lowlevel-epochs", str(args.lowlevel_epochs)]  # fmt: skip
    subprocess.run(cmd, check=True)
    summary = json.loads((args.out / "report" / "summary.json").read_text())
    print("\n".join(table(summary)))
    if args.results is not None:
        args.results.write_text(json.dumps(results(summary), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
