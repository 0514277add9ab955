"""Per-image test scores of the feature models (``test_scores.csv``) and comparisons of two models with intervals.

At test time the feature models (:class:`~brainit_pl.lit.bit.BITModule`, BIT and MindEye2-style;
:class:`~brainit_pl.lit.ridge.RidgeModule`) write, beside their TensorBoard events, one row per test sample
(subject, nsd_id) and metric: the token cosine of that sample (``clip_cos``), or the fraction of the other
samples of the test pool it is told apart from (``clip_2way``, ``vgg_2way``). The mean of a metric's rows is
the logged ``test/<metric>``.

:func:`compare_scores` turns two such tables on the same samples into each mean with its bootstrap interval
over images (:func:`~brainit_pl.metrics.bootstrap.bootstrap_ci`) and the paired difference with its
interval and verdict (:func:`~brainit_pl.metrics.bootstrap.paired_bootstrap`).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from brainit_pl.errors import require
from brainit_pl.files import atomic_write_text
from brainit_pl.metrics.bootstrap import LEVEL, N_BOOT, SEED, bootstrap_ci, paired_bootstrap

SCORES_FILE = "test_scores.csv"
COLUMNS = ("subject", "nsd_id", "metric", "value")

Key = tuple[int, int]  # (subject, nsd_id)
Scores = dict[str, dict[Key, float]]  # metric → sample → value


def write_test_scores(path: str | Path, keys: Any, values: Mapping[str, Any]) -> None:
    """Write ``test_scores.csv``: one row per sample and metric (columns :data:`COLUMNS`), atomically.

    Args:
        path: the CSV file.
        keys: (N, 2) integer (subject, nsd_id) per sample (tensor or array).
        values: metric name → (N,) per-image values, in the order of ``keys``.
    """
    rows = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for name, column in values.items():
        column = np.asarray(column, dtype=np.float64)
        require(len(column) == len(rows), f"{name}: {len(column)} per-image values for {len(rows)} samples")
        writer.writerows((int(s), int(i), name, repr(float(v))) for (s, i), v in zip(rows, column))
    atomic_write_text(path, out.getvalue())


def read_test_scores(path: str | Path) -> Scores:
    """A ``test_scores.csv`` as metric → (subject, nsd_id) → value.

    A sample listed more than once (the same image in several test samples, e.g. a padded DDP shard) gets
    the mean of its rows.
    """
    rows: dict[str, dict[Key, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        require(
            reader.fieldnames is not None and tuple(reader.fieldnames) == COLUMNS,
            f"{path}: expected the columns {','.join(COLUMNS)}",
        )
        for row in reader:
            rows[row["metric"]][(int(row["subject"]), int(row["nsd_id"]))].append(float(row["value"]))
    return {name: {key: float(np.mean(v)) for key, v in samples.items()} for name, samples in rows.items()}


def find_test_scores(run: str | Path) -> Path | None:
    """The newest ``test_scores.csv`` under a test run's folder, or ``None``."""
    found = sorted(Path(run).rglob(SCORES_FILE), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def mean_with_ci(
    values: Mapping[Key, float], n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED
) -> dict[str, Any]:
    """``{"mean", "ci": [low, high], "n_images"}`` of one model's per-image values."""
    array = np.array([values[k] for k in sorted(values)], dtype=np.float64)
    require(array.size > 0, "no per-image values to summarise")
    return {
        "mean": float(array.mean()),
        "ci": list(bootstrap_ci(array, n_boot, level, seed)),
        "n_images": int(array.size),
    }


def compare_scores(
    a: Mapping[Key, float],
    b: Mapping[Key, float],
    *,
    higher_is_better: bool = True,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = SEED,
) -> dict[str, Any]:
    """Model A against model B on the same test samples.

    Args:
        a: (subject, nsd_id) → per-image value of model A (one metric).
        b: the same for model B; it must hold the same samples.
        higher_is_better: the metric's direction.
        n_boot, level, seed: as :func:`~brainit_pl.metrics.bootstrap.paired_bootstrap` (both means and the
            difference are resampled with the same seed).

    Returns:
        ``{"a": {"mean", "ci", "n_images"}, "b": {...}, "diff": mean of a − b, "diff_ci": [low, high],
        "verdict": "better" | "worse" | "tie", "n_images"}``; the verdict is ``"tie"`` when the difference's
        interval contains 0.

    Raises:
        BrainITError: the two tables hold different samples.
    """
    require(
        set(a) == set(b),
        f"a paired comparison needs the same test samples: {len(set(a) - set(b))} only in A, "
        f"{len(set(b) - set(a))} only in B",
    )
    keys = sorted(a)
    paired = paired_bootstrap(
        [a[k] for k in keys],
        [b[k] for k in keys],
        higher_is_better=higher_is_better,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
    return {
        "a": mean_with_ci(a, n_boot, level, seed),
        "b": mean_with_ci(b, n_boot, level, seed),
        "diff": paired.mean_diff,
        "diff_ci": list(paired.ci),
        "verdict": paired.verdict,
        "n_images": paired.n_images,
    }


__all__ = [
    "COLUMNS",
    "SCORES_FILE",
    "compare_scores",
    "find_test_scores",
    "mean_with_ci",
    "read_test_scores",
    "write_test_scores",
]
