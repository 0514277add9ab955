"""Retrieval against a direct loop, and the suite's routing of image and embedding keywords."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from brainit_pl.errors import BrainITError
from brainit_pl.metrics import METRIC_NAMES, InvalidInputError, Retrieval, build_eval_suite, summarize
from brainit_pl.metrics.nets import build_metric_net


def retrieval_loop(brain: np.ndarray, image: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """MindEye2's loop: 30 subsets of 300; cosine similarity; top-1 hit per row, both directions."""
    rng = np.random.RandomState(seed)
    fwd, bwd = [], []
    for _ in range(30):
        idx = rng.choice(len(brain), size=300, replace=False)
        b = brain[idx] / np.linalg.norm(brain[idx], axis=1, keepdims=True)
        i = image[idx] / np.linalg.norm(image[idx], axis=1, keepdims=True)
        fwd.append(np.mean([np.argmax(b[k] @ i.T) == k for k in range(300)]))  # brain -> image
        bwd.append(np.mean([np.argmax(i[k] @ b.T) == k for k in range(300)]))  # image -> brain
    return float(np.mean(fwd)), float(np.mean(bwd))


@pytest.fixture(scope="module")
def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(347, 24, generator=g)
    brain = image + 1.6 * torch.randn(347, 24, generator=g)  # noisy: accuracy well between 0 and 1
    return brain, image


def test_retrieval_equals_the_loop(embeddings):
    brain, image = embeddings
    metric = Retrieval()
    metric.update(brain_embeds=brain[:100], image_embeds=image[:100])
    metric.update(brain_embeds=brain[100:], image_embeds=image[100:])
    result = metric.compute()
    fwd, bwd = retrieval_loop(brain.double().numpy(), image.double().numpy())
    assert result["retrieval_image"].item() == pytest.approx(fwd, abs=1e-12)
    assert result["retrieval_brain"].item() == pytest.approx(bwd, abs=1e-12)
    assert 0.05 < fwd < 0.95 and fwd != bwd


def test_perfect_and_random_embeddings(embeddings):
    _, image = embeddings
    perfect = Retrieval()
    perfect.update(brain_embeds=image, image_embeds=image)
    assert all(v.item() == 1.0 for v in perfect.compute().values())
    chance = Retrieval()
    chance.update(brain_embeds=torch.randn(300, 64), image_embeds=torch.randn(300, 64))
    assert all(v.item() < 0.03 for v in chance.compute().values())  # chance is 1/300


def test_fewer_than_300_items_is_a_clear_error():
    metric = Retrieval()
    metric.update(brain_embeds=torch.randn(299, 8), image_embeds=torch.randn(299, 8))
    with pytest.raises(BrainITError, match="at least 300 test items.*got 299"):
        metric.compute()


def test_mismatched_embeddings_are_rejected():
    with pytest.raises(InvalidInputError, match="same number of items"):
        Retrieval().update(brain_embeds=torch.randn(5, 8), image_embeds=torch.randn(6, 8))
    with pytest.raises(InvalidInputError, match="both"):
        Retrieval().update(brain_embeds=torch.randn(5, 8))


def test_without_embeddings_retrieval_is_absent():
    metric = Retrieval()
    metric.update()  # what a collection does when only images are given
    assert all(math.isnan(v.item()) for v in metric.compute().values())


def test_collection_routes_keywords_by_signature(embeddings):
    """torchmetrics' MetricCollection filters update kwargs per metric: images and embeddings never collide."""
    brain, image = embeddings
    net = build_metric_net("clip", tiny=True)
    suite = build_eval_suite(
        feature_nets={n: net for n in ("alexnet2", "alexnet5", "inception", "clip", "effnet", "swav")}
    )
    assert isinstance(suite, MetricCollection)
    gt = torch.rand(4, 3, 17, 15, generator=torch.Generator().manual_seed(1))
    suite.update(recons=gt, gt=gt)
    suite.update(brain_embeds=brain, image_embeds=image)
    values = summarize(suite.compute())
    assert list(values) == list(METRIC_NAMES)
    assert (
        values["pixcorr"] == pytest.approx(1.0)
        and values["clip"] == 1.0
        and values["swav"] == pytest.approx(0.0)
    )
    assert values["retrieval_image"] == pytest.approx(retrieval_loop(brain.numpy(), image.numpy())[0])
    suite.reset()
    suite.update(recons=gt, gt=gt)
    assert summarize(suite.compute())["retrieval_brain"] is None


def test_suite_refuses_a_network_of_another_protocol():
    net = build_metric_net("clip", tiny=True, protocol="braindiffuser")
    with pytest.raises(BrainITError, match="never mixed"):
        build_eval_suite("mindeye2", nets="tiny", feature_nets={"clip": net})
