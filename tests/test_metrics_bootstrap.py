"""Bootstrap intervals over images, paired comparisons, and the per-image values they resample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainit_pl.metrics import bootstrap
from brainit_pl.metrics.bootstrap import bootstrap_ci, paired_bootstrap
from brainit_pl.metrics.identification import TwoWayIdentification, two_way_identification, two_way_per_image


def _loop_percentile_ci(values: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """The textbook percentile bootstrap, one resample at a time from the same generator."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = [float(np.mean(values[row])) for row in idx]
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
    values = np.random.default_rng(1).normal(0.4, 0.1, size=200)
    low, high = bootstrap_ci(values, n_boot=500, level=0.9, seed=3)
    assert (low, high) == pytest.approx(_loop_percentile_ci(values, 500, 0.9, 3), abs=1e-12)
    assert low < values.mean() < high
    # about ±1.645 standard errors at 90%
    se = values.std(ddof=0) / np.sqrt(values.size)
    assert high - low == pytest.approx(2 * 1.645 * se, rel=0.15)
    assert bootstrap_ci(torch.from_numpy(values), n_boot=500, level=0.9, seed=3) == (low, high)  # tensors too
    assert bootstrap_ci(values, seed=4) != bootstrap_ci(values, seed=3)


def test_bootstrap_ci_of_a_constant_is_a_point_and_bad_input_is_refused():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, size=300)  # per-image difficulty shared by both systems
    better = base + 0.02 + rng.normal(0, 0.01, size=300)
    result = paired_bootstrap(better, base)
    assert (
        result.verdict == "better" and result.ci[0] > 0 and result.mean_diff == pytest.approx(0.02, abs=0.005)
    )
    assert paired_bootstrap(base, better).verdict == "worse"
    # a distance: lower is better
    assert paired_bootstrap(better, base, higher_is_better=False).verdict == "worse"
    same = paired_bootstrap(base + rng.normal(0, 0.01, size=300), base)
    assert same.verdict == "tie" and same.ci[0] < 0 < same.ci[1]
    # pairing matters: unpaired intervals of these two overlap, the paired one does not
    a_low, a_high = bootstrap_ci(better)
    b_low, b_high = bootstrap_ci(base)
    assert a_low < b_high
    assert result.to_dict()["ci"] == list(result.ci) and result.n_images == 300
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(base, base[:10])


def test_two_way_per_image_scores_average_to_the_metric():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(40, 12, generator=g, dtype=torch.float64)
    rec = gt + 1.5 * torch.randn(40, 12, generator=g, dtype=torch.float64)
    per_image = []
    gt_np, rec_np = gt.numpy(), rec.numpy()
    n = len(gt_np)
    for j in range(n):  # reconstruction j against every other ground truth, np.corrcoef as the evaluators
        own = np.corrcoef(gt_np[j], rec_np[j])[0, 1]
        wins = sum(np.corrcoef(gt_np[i], rec_np[j])[0, 1] < own for i in range(n) if i != j)
        per_image.append(wins / (n - 1))
    ours = two_way_per_image(gt, rec)
    assert ours.tolist() == pytest.approx(per_image, abs=1e-12)
    assert ours.mean().item() == pytest.approx(two_way_identification(gt, rec).item(), abs=1e-12)


def test_metric_per_image_through_a_network():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    recons = (0.5 * images + 0.5 * torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))).clamp(
        0, 1
    )
    metric = TwoWayIdentification(torch.nn.Flatten())  # raw pixels as features
    metric.update(recons=recons, gt=images)
    per_image = metric.per_image()
    assert per_image.shape == (6,) and per_image.mean().item() == pytest.approx(
        metric.compute().item(), abs=1e-12
    )


def test_defaults():
    assert (bootstrap.N_BOOT, bootstrap.LEVEL, bootstrap.SEED) == (1000, 0.95, 0)
