"""Draw docs/architecture.png: brainit-pl's layers and the path of one recording to a scored image.

The left panel is :data:`brainit_pl.layers.LAYERS` (the table ``tests/test_layers.py`` checks the imports
against), bottom layer at the bottom; the right panel follows one recording through the commands, each
step labelled with the package that does it. Re-run after changing either:

    python docs/architecture.py [--out docs/architecture.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from brainit_pl.layers import LAYERS  # noqa: E402

# (step, command that makes it, package) from raw files to scores; "|" separates parallel stages
PATH = [
    ("raw NSD files\n(betas, expdesign, stimuli)", "simulate / the NSD release", "data.layout · data.sim"),
    ("streaming store\n(subjNN.h5, images.h5)", "brainit-pl prepare", "data"),
    ("CLIP tokens · synthetic fMRI", "extract-features · synthesize-fmri", "features → data"),
    ("Universal Encoder\n(voxel embeddings)", "fit --config encoder.yaml", "models · lit"),
    ("V2C clusters", "brainit-pl cluster", "models"),
    ("BIT: semantic | low-level", "fit --config subj01*.yaml", "models · lit"),
    ("stage 2: BIT + unCLIP UNet", "fit --config stage2_subj01.yaml", "models · lit"),
    ("DIP | unCLIP | SDXL refine", "reconstruct · test", "recon (via lit.loading)"),
    ("scores, grids, reports", "evaluate · test", "metrics · viz"),
]

COLOURS = {
    "base": "#e8e8e8",
    "data": "#cfe3f7",
    "metrics": "#f7e3c8",
    "models": "#d8f0d2",
    "lit": "#e6d8f2",
    "recon": "#f6d2d2",
    "jobs": "#f2f2c6",
}


def colour(unit: str) -> str:
    top = unit.split(".")[0]
    if top in ("errors", "files", "devices", "viz", "backbones", "layers"):
        return COLOURS["base"]
    if top in ("features", "workflows", "cli"):
        return COLOURS["jobs"]
    return COLOURS.get(top, COLOURS["base"])


def box(ax, x: float, y: float, w: float, h: float, face: str, title: str, note: str = "") -> None:
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.003,rounding_size=0.01", fc=face, ec="#555")
    )
    ax.text(x + 0.02, y + h / 2, title, va="center", ha="left", fontsize=9, weight="bold")
    if note:
        ax.text(x + w - 0.02, y + h / 2, note, va="center", ha="right", fontsize=7.5, color="#333")


def draw(out: Path) -> list[str]:
    """Write the figure to ``out``; returns the labels of the layer boxes (for the test)."""
    units = [u for u in LAYERS if u != "layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 8.5), gridspec_kw={"width_ratios": [1.15, 1]})
    for ax in (left, right):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")

    left.set_title("layers of src/brainit_pl (imports point down only)", fontsize=11)
    h = 0.92 / len(units)
    for i, unit in enumerate(units):  # bottom layer at the bottom
        what, allowed = LAYERS[unit]
        y = 0.02 + i * h
        box(left, 0.01, y + 0.006, 0.98, h - 0.012, colour(unit), unit, what)

    right.set_title("one recording, raw files → scored image", fontsize=11)
    h = 0.92 / len(PATH)
    for i, (step, command, package) in enumerate(PATH):
        y = 0.94 - (i + 1) * h
        box(right, 0.02, y + 0.012, 0.58, h - 0.024, "#ffffff", step)
        right.text(0.63, y + h / 2 + 0.012, command, fontsize=8, family="monospace", va="center")
        right.text(0.63, y + h / 2 - 0.016, package, fontsize=8, color="#2a5d9f", va="center")
        if i + 1 < len(PATH):
            right.annotate(
                "", xy=(0.31, y - 0.011), xytext=(0.31, y + 0.011), arrowprops={"arrowstyle": "->", "lw": 1.2}
            )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return units


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("architecture.png"))
    print(f"wrote {parser.parse_args().out} ({len(draw(parser.parse_args().out))} layers)")


if __name__ == "__main__":
    main()
