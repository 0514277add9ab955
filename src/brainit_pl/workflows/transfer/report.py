"""The report of ``brainit-pl transfer-demo``: the variants side by side, their ratios, the pictures.

A *variant* is one way to decode the held-out subject S (:data:`VARIANTS`): ``transfer`` (base models of
the other subjects, only S's voxel embeddings learned from ``hours`` of S, nearest-neighbour init),
``transfer_random_init`` (the same, random init), ``scratch`` (the same BITs trained on those hours of S
only) and ``all_data`` (every subject with all its data: ``make demo``'s models).

A variant's record (:func:`variant_record`) holds its held-out feature prediction (``semantic_val_cos``,
``semantic_val_2way``, ``lowlevel_val_2way``) and, under ``recon``, each reconstruction stage's ``mean``
metrics dict (``metrics.json``'s schema; stages named as in the demo's summary: ``low_level``,
``semantic``). The pure functions here assemble ``summary.json`` (:func:`build_summary`), ``metrics.json``
(:func:`metrics_json`) and ``metrics.md`` (:func:`metrics_markdown`) from the records; the pictures are
drawn from the run's folders.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from brainit_pl.metrics.report import HEADERS, format_value
from brainit_pl.metrics.suite import METRIC_NAMES

VARIANTS: dict[str, str] = {
    "transfer": "transfer (NN init)",
    "transfer_random_init": "transfer (random init)",
    "scratch": "scratch (same hours)",
    "all_data": "all data",
}
# Held-out feature prediction: the report's name → the test metric the BIT / ridge modules log.
FEATURES: dict[str, str] = {
    "semantic_val_cos": "test/clip_cos",
    "semantic_val_2way": "test/clip_2way",
    "lowlevel_val_2way": "test/vgg_2way",
}
FEATURE_HEADERS = dict(zip(FEATURES, ("CLIP cos↑", "CLIP 2-way↑", "VGG 2-way↑")))
# reconstruct's stage folders → the stage names of the demo's summary.json (recon.low_level, ...)
STAGES: dict[str, str] = {
    "lowlevel": "low_level",
    "semantic": "semantic",
    "semantic_stock": "semantic_stock",
    "refined": "refined",
}
TITLES = {
    "low_level": "low-level (DIP)",
    "semantic": "semantic (stage-2 unCLIP)",
    "semantic_stock": "semantic (stage-1 BIT, stock unCLIP: ablation)",
    "refined": "refined (SDXL)",
}
RATIOS = (("transfer", "all_data"), ("transfer", "scratch"))


def variant_record(features: Mapping[str, float | None], recon: Mapping[str, Mapping[str, Any]]) -> dict:
    """One variant's entry of ``summary.json`` (non-finite numbers become ``None``: JSON has no NaN).

    Args:
        features: the report's feature names (:data:`FEATURES`' keys) → value; a missing one is ``None``.
        recon: stage (``low_level``, ``semantic``, ...) → that stage's ``mean`` metrics dict.
    """
    record: dict[str, Any] = {name: _number(features.get(name)) for name in FEATURES}
    record["recon"] = {stage: {k: _number(v) for k, v in metrics.items()} for stage, metrics in recon.items()}
    return record


def flat_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """A variant's numbers under one name each: ``semantic_val_cos``, ..., ``low_level.pixcorr``, ..."""
    flat = {name: record.get(name) for name in FEATURES}
    for stage, metrics in record.get("recon", {}).items():
        flat.update({f"{stage}.{name}": metrics.get(name) for name in METRIC_NAMES if name in metrics})
    return flat


def ratios(variants: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``transfer/all_data`` and ``transfer/scratch``: the quotient of every metric both variants have.

    A quotient is ``None`` where either value is missing or the denominator is 0. Above 1 favours the
    transfer, except for the distances (``effnet``, ``swav``: lower is better). Two-way identification is
    0.5 at chance, so two chance-level variants give 1.
    """
    out: dict[str, dict[str, float | None]] = {}
    for num, den in RATIOS:
        if num in variants and den in variants:
            top, bottom = flat_metrics(variants[num]), flat_metrics(variants[den])
            out[f"{num}/{den}"] = {
                key: None if top[key] is None or not bottom[key] else top[key] / bottom[key]
                for key in top
                if key in bottom
            }
    return out


def build_summary(
    *,
    subject: int,
    hours: float,
    base_subjects: list[int],
    variants: Mapping[str, Mapping[str, Any]],
    noise_ceiling: float | None,
    timings: Mapping[str, float],
    scoring: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``summary.json``: ``noise_ceiling``, ``transfer.{hours, <variants>, ratios, ...}``, ``timings_s``.

    Args:
        subject: S.
        hours: S's training data of the limited-data variants.
        base_subjects: the base models' subjects.
        variants: variant (:data:`VARIANTS`) → :func:`variant_record`.
        noise_ceiling: mean over S's voxels of the simulator's noise ceiling (``None``: the store has none).
        timings: step → seconds.
        scoring: what the feature-prediction metrics were computed on, in words.
        extra: more top-level keys (``v2c``, ...).
    """
    transfer: dict[str, Any] = {"subject": subject, "hours": hours, "base_subjects": list(base_subjects)}
    transfer["feature_scoring"] = scoring
    transfer.update({name: dict(variants[name]) for name in VARIANTS if name in variants})
    transfer["ratios"] = ratios(variants)
    summary = {"noise_ceiling": noise_ceiling, "transfer": transfer, **(extra or {})}
    summary["timings_s"] = {k: round(float(v), 1) for k, v in timings.items()}
    return summary


def metrics_json(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics.json``: stage → variant → metrics dict; the feature prediction; the ratios."""
    t = summary["transfer"]
    present = [v for v in VARIANTS if v in t]
    stages = [s for s in STAGES.values() if any(s in t[v]["recon"] for v in present)]
    return {
        "subject": t["subject"],
        "hours": t["hours"],
        "stages": {s: {v: t[v]["recon"].get(s) for v in present} for s in stages},
        "feature_prediction": {v: {k: t[v][k] for k in FEATURES} for v in present},
        "ratios": t["ratios"],
    }


def metrics_markdown(summary: Mapping[str, Any], n_images: int | None = None) -> str:
    """``metrics.md``: feature prediction and each reconstruction stage, a row per variant; the ratios."""
    t, s = summary["transfer"], summary["transfer"]["subject"]
    present = [v for v in VARIANTS if v in t]
    base = ", ".join(str(b) for b in t["base_subjects"])
    ceiling = format_value("pixcorr", summary.get("noise_ceiling"))
    lines = [
        f"# Subject {s} from {_hours(t['hours'])} of data",
        "",
        f"- Base models: subjects {base}. All data: every subject, all its sessions.",
        f"- Feature prediction: {t['feature_scoring']}.",
        f"- Reconstructions: the first {n_images or ''} shared test images of subject {s}, every variant.",
        f"- Mean noise ceiling of subject {s}'s voxels: {ceiling} (the simulator's truth: the explainable "
        "variance of 3-repeat averages).",
        "",
        "## Feature prediction",
        "",
        *_table([(VARIANTS[v], t[v]) for v in present], list(FEATURE_HEADERS), FEATURE_HEADERS),
    ]
    for stage in STAGES.values():
        rows = [(VARIANTS[v], t[v]["recon"][stage]) for v in present if stage in t[v]["recon"]]
        if rows:
            names = [n for n in METRIC_NAMES if any(r.get(n) is not None for _, r in rows)]
            lines += ["", f"## Reconstruction: {TITLES[stage]}", "", *_table(rows, names, HEADERS)]
    pairs = t["ratios"]
    if pairs:
        keys = [k for k in next(iter(pairs.values())) if any(p.get(k) is not None for p in pairs.values())]
        lines += [
            "",
            "## Ratios",
            "",
            "Above 1 favours the transfer (↓: below 1); two-way chance is 50%.",
            "",
        ]
        lines += ["| metric | " + " | ".join(pairs) + " |", "|" + "---|" * (1 + len(pairs))]
        lines += [
            f"| {_label(k)} | " + " | ".join(_ratio(p.get(k)) for p in pairs.values()) + " |" for k in keys
        ]
    return "\n".join(lines) + "\n"


def save_grid(path: str | os.PathLike, folders: Mapping[str, Path], subject: int, n_images: int = 6) -> None:
    """Ground truth, then each variant's stages, for S's first ``n_images`` test images; rows labelled.

    Args:
        folders: variant label → its ``reconstruct`` output folder (``gt/subjNN/``, ``subjNN/<stage>/``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from brainit_pl.files import atomic_path

    sub = f"subj{subject:02d}"
    first = next(iter(folders.values()))
    names = sorted(p.name for p in (first / "gt" / sub).glob("*.png"))[:n_images]
    rows = [("ground truth", first / "gt" / sub)]
    for label, folder in folders.items():
        rows += [(f"{label}\n{s}", folder / sub / s) for s in STAGES if (folder / sub / s).is_dir()]
    size = (1.3 * len(names) + 1.8, 1.3 * len(rows))
    fig, axes = plt.subplots(len(rows), len(names), figsize=size, squeeze=False)
    for (label, folder), row in zip(rows, axes):
        for name, ax in zip(names, row):
            image = folder / name  # a variant without this image (an interrupted run) shows a blank
            ax.imshow(np.asarray(Image.open(image)) if image.exists() else np.ones((8, 8, 3)))
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_cluster_map(path: str | os.PathLike, clusters: str | os.PathLike, store, subject: int) -> bool:
    """S's clusters (each voxel's nearest reference voxel's) on its brain; ``False`` without volume geometry.

    Args:
        store: an opened :class:`~brainit_pl.data.store.Store`.
    """
    from brainit_pl.models.v2c import load_clusters
    from brainit_pl.viz import plot_voxel_map

    cmap, sub = load_clusters(clusters), store.subject(subject)
    if sub.affine is None or sub.volume_shape is None:
        return False
    title = f"subject {subject}: {cmap.kind} clusters by nearest reference voxel (K={cmap.n_clusters})"
    labels = cmap.subject_labels(subject)
    plot_voxel_map(path, labels, sub.ijk, sub.volume_shape, sub.affine, categorical=True, title=title)
    return True


def recon_metrics(folder: Path) -> dict[str, dict[str, Any]]:
    """Stage (``low_level``, ``semantic``, ...) → the ``mean`` metrics of a ``reconstruct`` folder."""
    return {
        name: json.loads((folder / f"metrics_{stage}" / "metrics.json").read_text())["mean"]
        for stage, name in STAGES.items()
        if (folder / f"metrics_{stage}" / "metrics.json").exists()
    }


def subject_noise_ceiling(store: str | os.PathLike, subject: int) -> float | None:
    """Mean over S's voxels of NC = ncsnr² / (ncsnr² + 1/3), the demo's formula (3-repeat averages).

    ``None`` when the store has no ncsnr (the simulator writes its truth there).
    """
    from brainit_pl.data.store import Store

    ncsnr = Store(store).subject(subject).ncsnr
    if ncsnr is None:
        return None
    snr2 = ncsnr.astype(np.float64) ** 2
    return float((snr2 / (snr2 + 1 / 3)).mean())


# ------------------------------------------------------------------------------------------- helpers
def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _hours(hours: float) -> str:
    return f"{hours:g} h" if hours >= 1 else f"{round(hours * 60)} min"


def _table(
    rows: list[tuple[str, Mapping[str, Any]]], names: list[str], headers: Mapping[str, str]
) -> list[str]:
    lines = ["| variant | " + " | ".join(headers[n] for n in names) + " |", "|" + "---|" * (1 + len(names))]
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(n, row.get(n)) for n in names) + " |")
    return lines


def _cell(name: str, value: float | None) -> str:
    if name not in FEATURES:
        return format_value(name, value)
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if name.endswith("2way") else f"{value:.3f}"


def _label(key: str) -> str:
    if key in FEATURE_HEADERS:
        return FEATURE_HEADERS[key]
    stage, name = key.split(".", 1)
    return f"{stage}: {HEADERS.get(name, name)}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
