"""Data efficiency of a new subject on the simulated brain: held-out feature prediction vs hours of its data.

For each value of ``--hours`` (default 15 min, 30 min, 1 h and all of S's sessions), for the held-out subject
S of ``brainit-pl transfer-demo`` and its base models (``--base``, default runs/transfer-1h; trained there
first if missing; every step here is skipped when done):

* **BIT transfer**: ``brainit-pl transfer`` (NN init) of S from the base models;
* **BIT scratch**: ``configs/sim/bit_*.yaml`` on S's hours only (clusters: that transfer's NN clusters);
* **MindEye2-style**: ``configs/sim/mindeye2_*.yaml`` on S's hours only;
* **ridge**: ``configs/sim/ridge_*.yaml`` on S's hours only (closed form);

and at 1 h the ablations: **random init** of S's BIT voxel embeddings, and **anatomical clusters** (base BITs
retrained on anatomical clusters of the base subjects; S's voxels take their nearest base voxel's cluster, in
mm). The from-scratch models train 4 × ``--transfer-epochs`` epochs: as many optimizer steps as the transfer,
whose epochs hold 3 synthetic samples per real one.

Scoring: feature prediction only (no reconstruction, to stay affordable), on S's shared test images, which
no model trains on: ``semantic_val_cos`` (mean cosine of predicted vs true CLIP tokens) and
``lowlevel_val_2way`` (two-way identification on the VGG tokens), as in transfer-demo's report. The
transferred encoder is scored there too: ``noise_ceiling_fraction``, the median over S's voxels of r² / NC
(r: correlation of predicted and measured repeat-averaged betas over the shared images).

**What the noise ceiling bounds.** The simulator knows every voxel's noise: NC_v = ncsnr² / (ncsnr² +
mean 1/n) is the share of a repeat-averaged response's variance that the image explains. It bounds
*encoding* (no image → voxel model explains more), so the encoder panel draws it, dashed, at 1. It bounds
no decoding metric in closed form (a token cosine or a two-way accuracy also depends on the targets), so
the feature panels draw instead, dotted, the all-data models of transfer-demo (every subject, all
sessions) when ``--base`` has their scores.

Writes OUT/h<hours>/<method>/ (runs and ``scores.json``), OUT/data_efficiency.json, .md and .png (also in
TensorBoard: ``tensorboard --logdir OUT/tb``, image ``data_efficiency/curves``).

usage:
  make data-efficiency   # --store demo/store --subject 4 --base runs/transfer-1h --out runs/data-efficiency
  python benchmarks/data_efficiency.py --store demo/store --hours 0.25 1 --transfer-epochs 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from brainit_pl.errors import BrainITError
from brainit_pl.files import atomic_write_text
from brainit_pl.workflows.transfer.demo import TransferDemo, add_arguments
from brainit_pl.workflows.transfer.report import subject_noise_ceiling
from brainit_pl.workflows.transfer.subject import BRANCHES, check_subject, test_on_subject

METHODS = {
    "transfer": "BIT transfer",
    "scratch": "BIT scratch",
    "mindeye2": "MindEye2-style",
    "ridge": "ridge",
}
ABLATIONS = {
    "transfer_random_init": "BIT transfer, random init",
    "transfer_anatomical": "BIT transfer, anatomical clusters",
}
PLOTTED = {"semantic_val_cos": "CLIP token cosine (semantic)", "lowlevel_val_2way": "VGG two-way (low-level)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """transfer-demo's options (the base models, the epochs) and this study's."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve"
    )
    add_arguments(parser)
    add = parser.add_argument
    add(
        "--hours",
        nargs="+",
        default=["0.25", "0.5", "1", "all"],
        help="S's data: hours, or all [0.25 0.5 1 all]",
    )
    add("--base", type=Path, default=Path("runs/transfer-1h"), help="transfer-demo's OUT [runs/transfer-1h]")
    add("--out", type=Path, default=Path("runs/data-efficiency"), help="[runs/data-efficiency]")
    add("--no-ablations", action="store_true", help="skip the 1-hour random-init and anatomical rows")
    for unused in ("--all-data", "--recon-images", "--dip-steps"):  # no reconstruction, no all-data training
        add(unused, help=argparse.SUPPRESS)
    add("--no-train-all-data", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    numeric = []
    for h in args.hours:
        try:
            numeric += [] if h == "all" else [float(h)]
        except ValueError:
            parser.error(f"--hours takes numbers or 'all', got {h!r}")
    # TransferDemo checks S's data against args.hours; run() checks every value of the list.
    args.hours_list, args.hours = args.hours, min(numeric, default=1.0)
    args.all_data, args.recon_images, args.dip_steps = None, 1, 1  # all-data scores: read from --base
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (hours, method) run and score, then the table and the plot; returns data_efficiency.json."""
    from brainit_pl.data.store import Store

    demo = TransferDemo(args)
    s = demo.subject
    sessions = len(set(Store(demo.store).subject(s).trials["session"].tolist()))
    hours = {h: float(sessions) if h == "all" else float(h) for h in args.hours_list}
    for value in hours.values():  # every value fails now, not after an hour of training
        check_subject(demo.store, s, value, args.val_fraction, args.seed)
    base = demo.base_models(args.base.resolve() / "base")
    epochs = args.scratch_epochs or 4 * args.transfer_epochs
    results: dict[str, dict[str, Any]] = {}
    for label, h in hours.items():
        folder, tag = demo.out / f"h{label}", f"h{label}"
        transfer = demo.transfer(f"{tag} transfer", folder / "transfer", base, h, "nn", reconstruct=False)
        clusters = transfer / "v2c" / "clusters.npz"
        models = {"transfer": ({b: transfer / b / f"{b}.ckpt" for b in BRANCHES}, "bit")}
        for kind, method in (("bit", "scratch"), ("mindeye2", "mindeye2"), ("ridge", "ridge")):
            ckpts = {b: demo.fit_model(f"{tag} {method} {b}", folder / method / b, kind, b, [s],
                                       clusters=clusters, epochs=epochs, hours=h)
                     for b in BRANCHES}  # fmt: skip
            models[method] = (ckpts, kind)
        if h == 1.0 and not args.no_ablations:
            models.update(ablations(demo, base, folder, transfer))
        row = {m: demo.score(f"{tag} {m}", folder / m / "scores.json", c, k) for m, (c, k) in models.items()}
        enc = folder / "transfer" / "encoder_scores.json"
        demo.step(f"{tag} encoder scores", enc, lambda e=enc, t=transfer: atomic_write_text(e, json.dumps(
            score_encoder(t / "encoder" / "encoder.ckpt", demo.store, s), indent=2) + "\n"))  # fmt: skip
        row["transfer"]["encoder"] = json.loads(enc.read_text())
        results[label] = {"hours": h, **row}
    all_data = args.base / "all_data" / "scores.json"
    summary = {
        "subject": s,
        "base_subjects": demo.base_subjects,
        "noise_ceiling": subject_noise_ceiling(demo.store, s),
        "all_data": json.loads(all_data.read_text()) if all_data.exists() else None,
        "results": results,
        "timings_s": demo.timings,
    }
    atomic_write_text(demo.out / "data_efficiency.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(demo.out / "data_efficiency.md", markdown(summary))
    plot(summary, demo.out / "data_efficiency.png")
    print(markdown(summary))
    return summary


def ablations(demo: TransferDemo, base: dict[str, Any], folder: Path, transfer: Path) -> dict[str, tuple]:
    """The 1-hour random-init and anatomical-cluster transfers (they link the NN run's init-free steps)."""
    a, anat = demo.args, demo.out / "base_anatomical"
    rand = demo.transfer("h1 transfer random init", folder / "transfer_random_init", base, 1.0, "random",
                         reconstruct=False, share=transfer)  # fmt: skip
    subjects = [str(b) for b in demo.base_subjects]
    demo.step("base V2C anatomical", anat / "v2c" / "clusters.npz", lambda: demo.sh(
        "cluster", "--store", str(demo.store), "--out", str(anat / "v2c"), "--kind", "anatomical",
        "--clusters", str(a.clusters), "--subjects", *subjects, "--seed", str(a.seed)))  # fmt: skip
    clusters = anat / "v2c" / "clusters.npz"
    bits = {b: demo.fit_model(f"base anatomical {b} BIT", anat / b, "bit", b, demo.base_subjects,
                              clusters=clusters, external=base["external"], epochs=a.bit_epochs)
            for b in BRANCHES}  # fmt: skip
    ana = demo.transfer("h1 transfer anatomical", folder / "transfer_anatomical", base, 1.0, "nn",
                        reconstruct=False, share=transfer, shared_steps=("encoder", "synthetic"),
                        clusters=clusters, bits=bits)  # fmt: skip
    runs = (("transfer_random_init", rand), ("transfer_anatomical", ana))
    return {name: ({b: run / b / f"{b}.ckpt" for b in BRANCHES}, "bit") for name, run in runs}


def score_encoder(ckpt: Path, store: Path, subject: int) -> dict[str, float]:
    """The transferred encoder on S's shared images: median and p75 voxel r, median r² / noise ceiling."""
    from brainit_pl.lit.checkpoints import read_checkpoint
    from brainit_pl.lit.encoder import EncoderModule

    saved = read_checkpoint(ckpt, "EncoderModule").get("datamodule_hyper_parameters", {})
    module = EncoderModule.load_from_checkpoint(ckpt, map_location="cpu")
    metrics = test_on_subject(module, saved, store, subject)
    return {k.removeprefix("test/"): v for k, v in metrics.items() if k != "test/loss"}


def markdown(summary: dict[str, Any]) -> str:
    """Tables: each feature metric by method × hours (ablations at 1 h), the encoder by hours."""
    res, s, labels = summary["results"], summary["subject"], list(summary["results"])
    base = ", ".join(map(str, summary["base_subjects"]))
    head = ["| method | " + " | ".join(_hours(res[h]["hours"], h) for h in labels) + " |"]
    head.append("|---" * (1 + len(labels)) + "|")
    lines = [f"# Subject {s} from little data: held-out feature prediction (simulated demo)", ""]
    lines += [f"Base models: subjects {base}. Scored on subject {s}'s shared test images. Mean noise "
              f"ceiling of its voxels: {_fmt(summary['noise_ceiling'])}."]  # fmt: skip
    for key, title in PLOTTED.items():
        lines += ["", f"## {title}: `{key}`", "", *head]
        for m, name in {**METHODS, **ABLATIONS}.items():
            if any(m in res[h] for h in labels):
                cells = [_fmt(res[h].get(m, {}).get(key)) for h in labels]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if summary["all_data"]:
            cells = [_fmt(summary["all_data"].get(key))] + [""] * (len(labels) - 1)
            lines.append("| all data (every subject, all sessions) | " + " | ".join(cells) + " |")
    lines += ["", "## Transferred encoder on the shared images", "", "| hours | median r | median r²/NC |"]
    lines.append("|---|---|---|")
    for h in labels:
        enc = res[h]["transfer"].get("encoder", {})
        r, frac = _fmt(enc.get("voxel_corr_median")), _fmt(enc.get("noise_ceiling_fraction"))
        lines.append(f"| {_hours(res[h]['hours'], h)} | {r} | {frac} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Quality vs hours, a line per method (ablations: crosses at 1 h); upper references dashed / dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    xs = [res[h]["hours"] for h in res]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, PLOTTED.items()):
        for m, name in METHODS.items():
            ax.plot(xs, [res[h].get(m, {}).get(key, float("nan")) for h in res], marker="o", label=name)
        for m, name in ABLATIONS.items():
            points = [(res[h]["hours"], res[h][m].get(key)) for h in res if m in res[h]]
            if points:
                ax.scatter(*zip(*points), marker="x", s=60, label=name, zorder=3)
        if summary["all_data"] and summary["all_data"].get(key) is not None:
            ax.axhline(summary["all_data"][key], ls=":", c="k", label="all data (every subject)")
        ax.set(title=title)
    enc = [res[h]["transfer"].get("encoder", {}).get("noise_ceiling_fraction", float("nan")) for h in res]
    axes[2].plot(xs, enc, marker="o", label="transferred encoder")
    axes[2].axhline(1.0, ls="--", c="k", label="noise ceiling")
    axes[2].set(title="encoder: median r² / noise ceiling", ylim=(0, 1.05))
    for ax in axes:
        ax.set(xlabel="hours of the new subject's data", xscale="log")
        ax.set_xticks(xs, [_hours(x, h) for x, h in zip(xs, res)])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path.parent / "tb")) as writer:  # tensorboard --logdir OUT/tb
        writer.add_figure("data_efficiency/curves", fig)  # closes the figure


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _hours(hours: float, label: str) -> str:
    if label == "all":
        return f"all ({hours:g} h)"
    return f"{hours:g} h" if hours >= 1 else f"{round(hours * 60)} min"


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except BrainITError as err:
        print(f"data_efficiency: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
