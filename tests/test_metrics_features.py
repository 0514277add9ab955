"""Feature-prediction quality: fixed evaluation positions, token cosine, two-way identification on tokens."""

import numpy as np
import torch

from brainit_pl.metrics.features import (
    TokenCosine,
    TokenTwoWay,
    eval_positions,
    feature_quality,
    token_cosine,
)
from brainit_pl.metrics.identification import two_way_identification


def test_eval_positions_are_fixed_sorted_and_per_scale():
    counts = (30, 20, 9)
    a, b = eval_positions(counts, per_scale=(5, 4, 20)), eval_positions(counts, per_scale=(5, 4, 20))
    assert torch.equal(a, b) and len(a) == 5 + 4 + 9  # capped at the scale's size
    assert (
        (a[:5] < 30).all()
        and ((a[5:9] >= 30) & (a[5:9] < 50)).all()
        and torch.equal(a[9:], torch.arange(50, 59))
    )
    assert not torch.equal(a, eval_positions(counts, per_scale=(5, 4, 20), seed=1))


def test_token_cosine_and_two_way_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(7, 9, 5, generator=gen)
    pred = target + 0.8 * torch.randn(7, 9, 5, generator=gen)
    cos = np.mean(
        [
            [np.dot(p, t) / np.linalg.norm(p) / np.linalg.norm(t) for p, t in zip(pi, ti)]
            for pi, ti in zip(pred.numpy(), target.numpy())
        ],
        axis=1,
    )
    np.testing.assert_allclose(token_cosine(pred, target).numpy(), cos, rtol=1e-5)

    metric, halves = TokenCosine(), TokenCosine()
    metric.update(pred, target)
    halves.update(pred[:3], target[:3])
    halves.update(pred[3:], target[3:])  # two updates = one
    np.testing.assert_allclose(float(metric.compute()), cos.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(halves.compute()), cos.mean(), rtol=1e-5)

    positions = torch.tensor([0, 4, 8])
    two_way = TokenTwoWay(positions)
    two_way.update(pred[:4], target[:4])
    two_way.update(pred[4:], target[4:])
    expected = two_way_identification(target[:, positions].flatten(1), pred[:, positions].flatten(1))
    assert float(two_way.compute()) == float(expected) > 0.5


def test_feature_quality_names():
    sem = feature_quality("semantic", "val/", n_tokens=256)
    tokens = torch.randn(3, 256, 4)
    sem.update(tokens + 0.1, tokens)
    assert set(sem.compute()) == {"val/clip_cos", "val/clip_2way"}
    low = feature_quality("lowlevel", "test/")
    low.update(tokens, tokens)
    assert set(low.compute()) == {"test/vgg_2way"}
