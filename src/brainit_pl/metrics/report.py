"""Results of an evaluation: metrics.md, metrics.csv, metrics.json, and TensorBoard logging.

A *results* dict is exactly what metrics.json holds::

    {"protocol": "mindeye2", "protocol_version": "2",
     "protocol_options": {"resize": "bilinear", "antialias": false, ..., "retrieval_seed": 42},
     "n_images": 1000,
     "per_subject": {"subj01": {"pixcorr": 0.31, ..., "retrieval_brain": None}, ...},
     "mean": {"pixcorr": ..., ...},
     "ci": {"subj01": {"pixcorr_ci": [0.30, 0.32], ...}, ...},
     "ci_method": {"kind": "percentile bootstrap over images", "n_boot": 1000, "level": 0.95, "seed": 0}}

``ci`` holds a bootstrap interval (:mod:`brainit_pl.metrics.bootstrap`) for each metric that is a mean over
images (not retrieval), per subject. A metrics.json written before protocol versions existed has no
``protocol_version``; :func:`read_results` labels it :data:`~brainit_pl.metrics.protocols.UNVERSIONED`, and
:func:`comparability` says why two results cannot share a table.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainit_pl.files import atomic_write_text
from brainit_pl.metrics.protocols import UNVERSIONED, Protocol, get_protocol
from brainit_pl.metrics.suite import METRIC_NAMES, PER_IMAGE_METRICS, TWO_WAY_NETS

PERCENT_METRICS = frozenset((*TWO_WAY_NETS, "retrieval_image", "retrieval_brain"))
HEADERS: dict[str, str] = {
    "pixcorr": "PixCorr↑", "ssim": "SSIM↑", "alexnet2": "Alex(2)↑", "alexnet5": "Alex(5)↑",
    "inception": "Incep↑", "clip": "CLIP↑", "effnet": "Eff↓", "swav": "SwAV↓",
    "retrieval_image": "Image ret.↑", "retrieval_brain": "Brain ret.↑",
}  # fmt: skip
# Brain-IT paper, results table: mean of subjects 1, 2, 5, 7; 1000 shared test images; MindEye2 protocol.
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
    "Published results (Brain-IT paper), for context only: mean of subjects 1, 2, 5, 7 on "
    "the 1000 shared test images, MindEye2 protocol. Not computed here."
)
PROTOCOL_NOTES = {
    "mindeye2": "MindEye2's evaluator (every image first resized to 256², bilinear torch resizes)",
    "braindiffuser": (
        "Brain-Diffuser's evaluator (PIL resizes of 8-bit images; every network at 224²; column SSIM of "
        "scikit-image 0.17.2; EfficientNet-B1 IMAGENET1K_V1)"
    ),
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
    protocol: str | Protocol,
    per_subject: Mapping[str, Mapping[str, float | None]],
    n_images: int,
    *,
    ci: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None,
    ci_method: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the results dict (the content of metrics.json).

    Args:
        protocol: the protocol every subject was scored with (a name, or a :class:`Protocol` with options).
        per_subject: subject (``"subj01"``, or ``"all"`` for a flat folder) → metric name → value.
        n_images: number of test images (distinct ground-truth images scored).
        ci: subject → metric name → ``(low, high)`` bootstrap interval (or ``None``); written as
            ``<metric>_ci``.
        ci_method: how the intervals were computed (``n_boot``, ``level``, ``seed``).
        options: further options that define the numbers (``retrieval_seed``), added to the protocol's.
    """
    proto = get_protocol(protocol)
    rows = {subject: {name: row.get(name) for name in METRIC_NAMES} for subject, row in per_subject.items()}
    results: dict[str, Any] = {
        **proto.describe(),
        "n_images": int(n_images),
        "per_subject": rows,
        "mean": mean_over_subjects(rows),
    }
    results["protocol_options"] = {**results["protocol_options"], **dict(options or {})}
    if ci is not None:
        results["ci"] = {
            subject: {
                f"{name}_ci": None if bounds.get(name) is None else [float(v) for v in bounds[name]]
                for name in PER_IMAGE_METRICS
                if name in bounds
            }
            for subject, bounds in ci.items()
        }
        results["ci_method"] = dict(ci_method or {})
    return results


def read_results(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a metrics.json (or take its dict), labelling one written before protocol versions existed.

    Returns:
        The results, with ``protocol_version`` set to :data:`UNVERSIONED` and ``protocol_options`` to
        ``None`` where the file has none.
    """
    results = dict(source) if isinstance(source, Mapping) else json.loads(Path(source).read_text())
    if "protocol_version" not in results:
        results["protocol_version"] = UNVERSIONED
        results.setdefault("protocol_options", None)
    return results


def version_label(results: Mapping[str, Any]) -> str:
    """``"mindeye2 v2"``, or ``"mindeye2, unversioned (...)"`` for an old metrics.json."""
    version = results.get("protocol_version", UNVERSIONED)
    protocol = results.get("protocol", "?")
    return f"{protocol}, {version}" if version == UNVERSIONED else f"{protocol} v{version}"


def comparability(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Why two results may not share a table: different protocols, versions, options or image counts.

    Returns:
        Human-readable reasons; empty when the two were computed the same way.
    """
    a, b = read_results(a), read_results(b)
    reasons = []
    if a.get("protocol") != b.get("protocol"):
        reasons.append(f"protocols differ: {a.get('protocol')} vs {b.get('protocol')}")
    if a["protocol_version"] != b["protocol_version"]:
        reasons.append(f"protocol versions differ: {version_label(a)} vs {version_label(b)}")
    elif a["protocol_version"] == UNVERSIONED:
        reasons.append(f"both are {UNVERSIONED}: their protocol options are unknown")
    elif a.get("protocol_options") != b.get("protocol_options"):
        reasons.append(f"protocol options differ: {a.get('protocol_options')} vs {b.get('protocol_options')}")
    if a.get("n_images") != b.get("n_images"):
        reasons.append(f"test image counts differ: {a.get('n_images')} vs {b.get('n_images')}")
    return reasons


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


def _ci_table(ci: Mapping[str, Mapping[str, Sequence[float] | None]]) -> list[str]:
    header = ["Subject", *(HEADERS[n] for n in PER_IMAGE_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for subject, bounds in ci.items():
        cells = [subject]
        for name in PER_IMAGE_METRICS:
            pair = bounds.get(f"{name}_ci")
            cells.append(
                "—" if pair is None else f"{format_value(name, pair[0])}–{format_value(name, pair[1])}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(
    results: Mapping[str, Any], *, nets: str | None = None, counts: Mapping[str, int] | None = None
) -> str:
    """metrics.md: our table (per subject + mean), then the published rows in a separate table."""
    results = read_results(results)
    protocol = results["protocol"]
    lines = [
        "# Image reconstruction metrics",
        "",
        f"- Protocol: `{protocol}` — {PROTOCOL_NOTES.get(protocol, protocol)}",
        f"- Protocol version: {results['protocol_version']}",
    ]
    if results.get("protocol_options"):
        options = ", ".join(f"{k}={v}" for k, v in results["protocol_options"].items())
        lines.append(f"- Protocol options: {options}")
    lines.append(f"- Test images: {results['n_images']}")
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
    if results.get("ci"):
        method = results.get("ci_method") or {}
        level = method.get("level", 0.95)
        lines += [
            "",
            f"{100 * level:.0f}% bootstrap intervals over images ({method.get('n_boot', '?')} resamples, "
            f"seed {method.get('seed', '?')}):",
            "",
        ]
        lines += _ci_table(results["ci"])
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
    writer.writerow(["row", "source", "protocol", "protocol_version", "n_images", *METRIC_NAMES])

    def cells(row: Mapping[str, float | None]) -> list[str]:
        return ["" if row.get(n) is None else repr(float(row[n])) for n in METRIC_NAMES]

    results = read_results(results)
    protocol, version, n_images = results["protocol"], results["protocol_version"], results["n_images"]
    for subject, row in results["per_subject"].items():
        writer.writerow(
            [subject, "ours", protocol, version, (counts or {}).get(subject, n_images), *cells(row)]
        )
    writer.writerow(["mean", "ours", protocol, version, n_images, *cells(results["mean"])])
    if protocol == "mindeye2":  # the paper's numbers, from MindEye2's own notebook (no version of ours)
        for method, row in PUBLISHED.items():
            writer.writerow([method, "published", "mindeye2", "", 1000, *cells(row)])
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
    "comparability",
    "log_to_tensorboard",
    "make_results",
    "mean_over_subjects",
    "read_results",
    "render_csv",
    "render_markdown",
    "version_label",
    "write_reports",
]
