"""Results of an evaluation: metrics.md, metrics.csv, metrics.json, and TensorBoard logging.

A *results* dict is exactly what metrics.json holds::

    {"protocol": "mindeye2", "n_images": 1000,
     "per_subject": {"subj01": {"pixcorr": 0.31, ..., "retrieval_brain": None}, ...},
     "mean": {"pixcorr": ..., ...}}

Two-way identification and retrieval are fractions in [0, 1] (shown as percentages in metrics.md); a metric
that was not computed (retrieval without embeddings) is ``None`` / empty in the CSV / "—" in markdown. The
mean over subjects is ``None`` for a metric that some subject lacks. The published rows of the Brain-IT
paper are added for context in their own table, never mixed with ours, and in the CSV only under the
``mindeye2`` protocol they were computed with.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from brainit_pl.files import atomic_write_text
from brainit_pl.metrics.suite import METRIC_NAMES, TWO_WAY_NETS

PERCENT_METRICS = frozenset((*TWO_WAY_NETS, "retrieval_image", "retrieval_brain"))
HEADERS: dict[str, str] = {
    "pixcorr": "PixCorr↑", "ssim": "SSIM↑", "alexnet2": "Alex(2)↑", "alexnet5": "Alex(5)↑",
    "inception": "Incep↑", "clip": "CLIP↑", "effnet": "Eff↓", "swav": "SwAV↓",
    "retrieval_image": "Image ret.↑", "retrieval_brain": "Brain ret.↑",
}  # fmt: skip
# Brain-IT paper (BRAINIT.md §8): mean of subjects 1, 2, 5, 7; 1000 shared test images; MindEye2 protocol.
_PUBLISHED_COLUMNS = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav")
PUBLISHED: dict[str, dict[str, float | None]] = {
    method: dict(zip(_PUBLISHED_COLUMNS, values))
    for method, values in (
        ("MindEye2, 40 h", (0.322, 0.431, 0.961, 0.986, 0.954, 0.930, 0.619, 0.344)),
        ("Brain-IT, 40 h", (0.386, 0.486, 0.984, 0.995, 0.973, 0.964, 0.564, 0.320)),
        ("MindEye2, 1 h", (0.195, 0.419, 0.842, 0.906, 0.812, 0.792, 0.810, 0.468)),
        ("Brain-IT, 1 h", (0.331, 0.473, 0.971, None, None, None, None, None)),
    )
}
PUBLISHED_NOTE = (
    "Published results (Brain-IT paper; BRAINIT.md §8), for context only: mean of subjects 1, 2, 5, 7 on "
    "the 1000 shared test images, MindEye2 protocol. Not computed here."
)
PROTOCOL_NOTES = {
    "mindeye2": "MindEye2's evaluator (every image first resized to 256², bilinear, antialiased)",
    "braindiffuser": "Brain-Diffuser's evaluator (PIL resizes of 8-bit images; every network at 224²)",
}
FILES = ("metrics.md", "metrics.csv", "metrics.json")


def mean_over_subjects(per_subject: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over subjects; ``None`` where any subject lacks it."""
    mean: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [row.get(name) for row in per_subject.values()]
        mean[name] = None if not values or any(v is None for v in values) else sum(values) / len(values)
    return mean


def make_results(
    protocol: str, per_subject: Mapping[str, Mapping[str, float | None]], n_images: int
) -> dict[str, Any]:
    """Assemble the results dict (the content of metrics.json).

    Args:
        protocol: the protocol every subject was scored with.
        per_subject: subject (``"subj01"``, or ``"all"`` for a flat folder) → metric name → value.
        n_images: number of test images (distinct ground-truth images scored).
    """
    rows = {subject: {name: row.get(name) for name in METRIC_NAMES} for subject, row in per_subject.items()}
    return {
        "protocol": protocol,
        "n_images": int(n_images),
        "per_subject": rows,
        "mean": mean_over_subjects(rows),
    }


def format_value(name: str, value: float | None) -> str:
    """Markdown cell: percentages for two-way and retrieval, 3 decimals otherwise, "—" when absent."""
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if name in PERCENT_METRICS else f"{value:.3f}"


def _table(
    rows: list[tuple[str, Mapping[str, float | None]]],
    first: str,
    names: tuple[str, ...],
    counts: Mapping[str, int] | None = None,
) -> list[str]:
    header = [first, *(["N"] if counts is not None else []), *(HEADERS[n] for n in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rows:
        cells = [label, *([str(counts.get(label, ""))] if counts is not None else [])]
        lines.append("| " + " | ".join(cells + [format_value(n, row.get(n)) for n in names]) + " |")
    return lines


def render_markdown(
    results: Mapping[str, Any], *, nets: str | None = None, counts: Mapping[str, int] | None = None
) -> str:
    """metrics.md: our table (per subject + mean), then the published rows in a separate table."""
    protocol = results["protocol"]
    lines = [
        "# Image reconstruction metrics",
        "",
        f"- Protocol: `{protocol}` — {PROTOCOL_NOTES.get(protocol, protocol)}",
        f"- Test images: {results['n_images']}",
    ]
    if nets == "real":
        lines.append(
            "- Feature networks: the published weights (AlexNet, Inception v3, CLIP ViT-L/14, "
            "EfficientNet-B1, SwAV)"
        )
    elif nets is not None:
        lines.append(
            f"- Feature networks: **{nets}** random networks — a smoke test; these numbers are NOT "
            "comparable with published results"
        )
    lines += [
        "- Two-way identification and retrieval in %, chance 50% / 0.33%; Eff and SwAV are distances.",
        "",
    ]
    rows = list(results["per_subject"].items())
    if len(rows) > 1 or (rows and rows[0][0] != "all"):
        rows.append(("**mean**", results["mean"]))
    lines += _table(rows, "Subject", METRIC_NAMES, counts)
    lines += ["", "## Published results, for context", "", PUBLISHED_NOTE]
    if protocol != "mindeye2":
        lines.append(
            f"They use the MindEye2 protocol, so they are not comparable with the `{protocol}` table above."
        )
    lines += ["", *_table(list(PUBLISHED.items()), "Method", _PUBLISHED_COLUMNS), ""]
    return "\n".join(lines)


def render_csv(results: Mapping[str, Any], counts: Mapping[str, int] | None = None) -> str:
    """metrics.csv: one row per subject, the mean, and (mindeye2 only) the published rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "source", "protocol", "n_images", *METRIC_NAMES])

    def cells(row: Mapping[str, float | None]) -> list[str]:
        return ["" if row.get(n) is None else repr(float(row[n])) for n in METRIC_NAMES]

    protocol, n_images = results["protocol"], results["n_images"]
    for subject, row in results["per_subject"].items():
        writer.writerow([subject, "ours", protocol, (counts or {}).get(subject, n_images), *cells(row)])
    writer.writerow(["mean", "ours", protocol, n_images, *cells(results["mean"])])
    if protocol == "mindeye2":
        for method, row in PUBLISHED.items():
            writer.writerow([method, "published", "mindeye2", 1000, *cells(row)])
    return buffer.getvalue()


def write_reports(
    out_dir: str | os.PathLike,
    results: Mapping[str, Any],
    *,
    nets: str | None = None,
    counts: Mapping[str, int] | None = None,
) -> dict[str, Path]:
    """Write metrics.md, metrics.csv and metrics.json into ``out_dir``, each atomically.

    Args:
        out_dir: output folder (created).
        results: from :func:`make_results`.
        nets: ``"real"``, ``"tiny"`` or ``"random"``, stated in metrics.md.
        counts: images per subject, shown in metrics.md / metrics.csv when given.

    Returns:
        file name → path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "metrics.md": render_markdown(results, nets=nets, counts=counts),
        "metrics.csv": render_csv(results, counts),
        "metrics.json": json.dumps(dict(results), indent=2) + "\n",
    }
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    return {name: out / name for name in FILES}


def tensorboard_tag(name: str) -> str:
    """Logged name of a metric: two-way scores get ``_2way`` (``test/clip_2way``), others keep theirs."""
    return f"{name}_2way" if name in TWO_WAY_NETS else name


def log_to_tensorboard(
    logger_or_writer: Any, results: Mapping[str, Any], prefix: str = "test", step: int = 0
) -> None:
    """Log a results dict: the means as ``{prefix}/{tag}``, each subject as ``{prefix}/{subject}/{tag}``, and
    metrics.md as text ``{prefix}/metrics``.

    Args:
        logger_or_writer: a Lightning logger (``log_metrics``; TensorBoard's ``experiment`` also gets the
            text) or a ``torch.utils.tensorboard.SummaryWriter``.
        results: from :func:`make_results`.
        prefix: tag prefix (``"test"``).
        step: global step.
    """
    scalars = {f"{prefix}/{tensorboard_tag(n)}": v for n, v in results["mean"].items() if v is not None}
    subjects = results["per_subject"]
    if len(subjects) > 1:
        for subject, row in subjects.items():
            scalars.update(
                {f"{prefix}/{subject}/{tensorboard_tag(n)}": v for n, v in row.items() if v is not None}
            )
    text = render_markdown(results)
    if hasattr(logger_or_writer, "log_metrics"):  # a Lightning logger
        logger_or_writer.log_metrics(scalars, step=step)
        writer = getattr(logger_or_writer, "experiment", None)
    else:
        writer = logger_or_writer
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
    if writer is not None and hasattr(writer, "add_text"):
        writer.add_text(f"{prefix}/metrics", text, global_step=step)
        if hasattr(writer, "flush"):
            writer.flush()


__all__ = [
    "FILES",
    "PUBLISHED",
    "log_to_tensorboard",
    "make_results",
    "mean_over_subjects",
    "render_csv",
    "render_markdown",
    "write_reports",
]
