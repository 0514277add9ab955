"""Bootstrap over images: confidence intervals of a metric, and paired comparisons of two systems.

Every image metric of the suite except retrieval is a mean over test images of a per-image value
(:func:`~brainit_pl.metrics.suite.per_image_values`): PixCorr and SSIM per pair, the correlation distance per
pair, and for two-way identification the fraction of the N − 1 comparisons that each reconstruction wins.
Resampling images with replacement and re-taking the mean gives a percentile interval of the metric
(:func:`bootstrap_ci`); resampling the *same* images for two systems gives an interval of their difference
(:func:`paired_bootstrap`). For two-way identification the per-image scores are resampled, not the
correlation matrix recomputed on the resample, so its interval reflects the choice of test images, with the
competitors of each image held fixed.

Resamples come from ``numpy.random.default_rng(seed)``: the same seed, values and ``n_boot`` give the same
interval, and two systems compared with one seed see the same resamples.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

N_BOOT = 1000
LEVEL = 0.95
SEED = 0


def _as_array(values: Sequence[float] | np.ndarray | Tensor, what: str) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor means torch is loaded: plain values need no torch import
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{what} must be a non-empty 1-D sequence of per-image values, got shape {array.shape}"
        )
    return array


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) indices of ``n`` images drawn with replacement, from ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    values_per_image: Sequence[float] | np.ndarray | Tensor,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images.

    Args:
        values_per_image: (N,) one value per test image; the metric is their mean.
        n_boot: number of resamples.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles of the resampled means).
        seed: seed of the resamples.

    Returns:
        ``(low, high)``. NaN values (e.g. PixCorr of a constant image) propagate, as in the mean.
    """
    _check(n_boot, level)
    values = _as_array(values_per_image, "values_per_image")
    means = values[resample_indices(values.size, n_boot, seed)].mean(axis=1)  # (n_boot,)
    return _percentile_interval(means, level)


def stratified_bootstrap_ci(
    groups: Sequence[Sequence[float] | np.ndarray | Tensor],
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile interval of the mean over groups (subjects) of each group's mean over its images.

    Each resample draws every subject's images with replacement within that subject, so the interval is the
    one of the number the tables report (the mean over subjects), whatever the subjects' image counts.

    Args:
        groups: per subject, (N_s,) one value per test image.
        n_boot, level, seed: as :func:`bootstrap_ci` (subject s uses the seed ``seed + s``).
    """
    _check(n_boot, level)
    arrays = [_as_array(g, f"group {i}") for i, g in enumerate(groups)]
    if not arrays:
        raise ValueError("stratified_bootstrap_ci needs at least one group")
    means = np.mean(
        [a[resample_indices(a.size, n_boot, seed + i)].mean(axis=1) for i, a in enumerate(arrays)], axis=0
    )  # (n_boot,)
    return _percentile_interval(means, level)


@dataclass(frozen=True)
class PairedComparison:
    """The difference of two systems scored on the same images (``a − b``).

    Attributes:
        mean_diff: mean over images of ``a − b``.
        ci: percentile bootstrap interval of ``mean_diff``.
        verdict: ``"better"`` / ``"worse"`` (for ``a`` against ``b``, given the metric's direction) when the
            interval excludes 0, else ``"tie"``.
        n_images: number of paired images.
        n_boot: number of resamples.
        level: coverage of the interval.
    """

    mean_diff: float
    ci: tuple[float, float]
    verdict: str
    n_images: int
    n_boot: int
    level: float

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values (the interval as a list)."""
        out = asdict(self)
        out["ci"] = list(self.ci)
        return out


def paired_bootstrap(
    a: Sequence[float] | np.ndarray | Tensor,
    b: Sequence[float] | np.ndarray | Tensor,
    *,
    higher_is_better: bool = True,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = SEED,
) -> PairedComparison:
    """Paired bootstrap of two systems' per-image values on the same images, in the same order.

    Args:
        a: (N,) per-image values of system A.
        b: (N,) per-image values of system B, image k the same as in ``a``.
        higher_is_better: the metric's direction (``False`` for EffNet-B and SwAV distances).
        n_boot: number of resamples (the same resampled images for both systems).
        level: coverage of the interval.
        seed: seed of the resamples.

    Returns:
        A :class:`PairedComparison` of ``a − b``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or bad ``n_boot`` / ``level``.
    """
    _check(n_boot, level)
    a_values, b_values = _as_array(a, "a"), _as_array(b, "b")
    if a_values.shape != b_values.shape:
        raise ValueError(
            f"a paired comparison needs the same images for both systems: got {a_values.size} and "
            f"{b_values.size} values"
        )
    diff = a_values - b_values
    means = diff[resample_indices(diff.size, n_boot, seed)].mean(axis=1)
    low, high = _percentile_interval(means, level)
    if low > 0 or high < 0:
        a_higher = low > 0
        verdict = "better" if a_higher == higher_is_better else "worse"
    else:
        verdict = "tie"
    return PairedComparison(float(diff.mean()), (low, high), verdict, int(diff.size), n_boot, level)


__all__ = [
    "LEVEL",
    "N_BOOT",
    "SEED",
    "PairedComparison",
    "bootstrap_ci",
    "paired_bootstrap",
    "resample_indices",
    "stratified_bootstrap_ci",
]
