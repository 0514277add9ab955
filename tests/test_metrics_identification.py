"""Two-way identification and correlation distance against direct numpy / scipy loops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from torch import nn

from brainit_pl.errors import BrainITError
from brainit_pl.metrics import (
    CorrelationDistance,
    InvalidInputError,
    TwoWayIdentification,
    two_way_identification,
)
from brainit_pl.metrics.nets import build_metric_net


def two_way_loop(gt_features: np.ndarray, recon_features: np.ndarray) -> float:
    """The definition, one comparison at a time: for each recon j, the share of i != j with r(i, j) < r(j, j)."""
    n = len(gt_features)
    shares = []
    for j in range(n):
        own = np.corrcoef(gt_features[j], recon_features[j])[0, 1]
        wins = sum(np.corrcoef(gt_features[i], recon_features[j])[0, 1] < own for i in range(n) if i != j)
        shares.append(wins / (n - 1))
    return float(np.mean(shares))


def _images(n: int, seed: int, size: tuple[int, int] = (21, 19)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def alexnet5():
    return build_metric_net("alexnet5", tiny=True)


@pytest.fixture(scope="module")
def related():
    """Nine pairs; reconstructions are noisy versions of the ground truths (a score well above chance)."""
    gt = _images(9, 0)
    recons = (0.5 * gt + 0.5 * _images(9, 1)).clamp(0, 1)
    return recons, gt


def test_vectorised_score_equals_the_loop():
    rng = np.random.default_rng(0)
    gt_f, rec_f = rng.normal(size=(8, 7)), rng.normal(size=(8, 7))
    rec_f[:4] += gt_f[:4]  # half of the pairs related
    expected = two_way_loop(gt_f, rec_f)
    assert two_way_identification(torch.from_numpy(gt_f), torch.from_numpy(rec_f)).item() == pytest.approx(
        expected, abs=1e-12
    )
    # and equal to MindEye2's / Brain-Diffuser's numpy code
    r = np.corrcoef(gt_f, rec_f)[:8, 8:]
    assert np.mean(np.sum(r < np.diag(r), 0)) / 7 == pytest.approx(expected, abs=1e-12)


def test_metric_equals_the_loop_on_tiny_network_features(alexnet5, related):
    recons, gt = related
    metric = TwoWayIdentification(alexnet5)
    metric.update(recons=recons[:4], gt=gt[:4])
    metric.update(recons=recons[4:], gt=gt[4:])
    expected = two_way_loop(alexnet5(gt).numpy(), alexnet5(recons).numpy())
    assert metric.compute().item() == pytest.approx(expected, abs=1e-9)
    assert expected > 0.6


@pytest.mark.parametrize("name", ["alexnet2", "alexnet5", "inception", "clip"])
def test_identical_sets_score_one_and_random_sets_about_half(name):
    net = build_metric_net(name, tiny=True)
    gt, other = _images(32, 2, (16, 16)), _images(32, 3, (16, 16))
    same, rand = TwoWayIdentification(net), TwoWayIdentification(net)
    same.update(recons=gt, gt=gt)
    rand.update(recons=other, gt=gt)
    assert same.compute().item() == 1.0
    assert abs(rand.compute().item() - 0.5) < 0.15


def test_random_features_score_chance():
    metric = TwoWayIdentification(nn.Flatten())  # any module works; here raw pixels are the features
    metric.update(recons=_images(100, 4, (6, 6)), gt=_images(100, 5, (6, 6)))
    assert abs(metric.compute().item() - 0.5) < 0.1  # the score's sd is about 0.03 at N = 100


def test_correlation_distance_equals_scipy(related):
    recons, gt = related
    net = build_metric_net("effnet", tiny=True)
    metric = CorrelationDistance(net)
    metric.update(recons=recons[:5], gt=gt[:5])
    metric.update(recons=recons[5:], gt=gt[5:])
    # float64, as the metric computes; scipy on the float32 features would add float32 rounding (~1e-8)
    f_gt, f_rec = net(gt).double().numpy(), net(recons).double().numpy()
    expected = np.mean([scipy.spatial.distance.correlation(f_gt[i], f_rec[i]) for i in range(len(f_gt))])
    assert metric.compute().item() == pytest.approx(expected, abs=1e-9)
    same = CorrelationDistance(net)
    same.update(recons=gt, gt=gt)
    assert same.compute().item() == pytest.approx(0.0, abs=1e-12)


def test_two_updates_equal_one(alexnet5, related):
    recons, gt = related
    once, twice = TwoWayIdentification(alexnet5), TwoWayIdentification(alexnet5)
    once.update(recons=recons, gt=gt)
    twice.update(recons=recons[:2], gt=gt[:2])
    twice.update(recons=recons[2:], gt=gt[2:])
    assert once.compute().item() == twice.compute().item()


def test_feature_network_stays_out_of_state_dict_and_module_tree(alexnet5, related):
    recons, gt = related
    metric = TwoWayIdentification(alexnet5, compute_on_cpu=True)
    assert list(metric.children()) == [] and list(metric.parameters()) == []
    metric.update(recons=recons, gt=gt)
    assert metric.state_dict() == {}  # metric states are not persistent, the network never is
    metric.reset()
    with (
        pytest.warns(UserWarning, match="before the ``update``"),
        pytest.raises(InvalidInputError, match="no images"),
    ):
        metric.compute()


def test_clones_share_the_frozen_network(alexnet5):
    metric = TwoWayIdentification(alexnet5)
    assert metric.clone().feature_extractor is alexnet5


def test_one_image_is_not_enough(alexnet5):
    metric = TwoWayIdentification(alexnet5)
    metric.update(recons=_images(1, 0), gt=_images(1, 1))
    with pytest.raises(InvalidInputError, match="at least 2"):
        metric.compute()


def test_bad_images_are_rejected_before_the_network(alexnet5):
    metric = TwoWayIdentification(alexnet5)
    with pytest.raises(InvalidInputError, match="different numbers"):
        metric.update(recons=_images(3, 0), gt=_images(4, 0))
    with pytest.raises(InvalidInputError, match="uint8"):
        metric.update(recons=(_images(2, 0) * 255).to(torch.uint8), gt=_images(2, 0))


def test_a_name_builds_the_real_network_and_reports_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINIT_WEIGHTS", str(tmp_path))
    with pytest.raises(BrainITError, match="inception_v3_google-0cc3c7bd.pth"):
        TwoWayIdentification("inception")
