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


def retrieval_loop(brain: np.ndarray, image: np.ndarray, seed: int = 42) -> tuple[float, float]:
    """MindEye2's final_evaluations code path, re-typed: seed numpy's global state (seed_everything), draw
    30 subsets with np.random.choice(np.arange(N), 300, replace=False), L2-normalise, and score
    ``topk(batchwise_cosine_similarity(...), labels, k=1)``, whose similarity is the transpose of ``Z @ B.T``.

    Returns:
        ``(fwd, bwd)``: MindEye2's published "image retrieval" and "brain retrieval".
    """

    def batchwise_cosine_similarity(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # utils.py
        z, b = z.flatten(1), b.flatten(1).T
        z_norm = torch.linalg.norm(z, dim=1, keepdim=True)
        b_norm = torch.linalg.norm(b, dim=0, keepdim=True)
        return ((z @ b) / (z_norm @ b_norm)).T

    def top1(similarities: torch.Tensor, labels: torch.Tensor) -> float:  # utils.topk(..., k=1)
        return (torch.sum(torch.argsort(similarities, axis=1)[:, -1] == labels) / len(labels)).item()

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        fwds, bwds = [], []
        for _ in range(30):
            samples = np.random.choice(np.arange(len(image)), size=300, replace=False)
            emb = torch.nn.functional.normalize(torch.from_numpy(image[samples]), dim=-1)  # CLIP-Image
            emb_ = torch.nn.functional.normalize(torch.from_numpy(brain[samples]), dim=-1)  # CLIP-Brain
            labels = torch.arange(len(emb))
            bwd_sim = batchwise_cosine_similarity(emb, emb_)  # clip, brain
            fwd_sim = batchwise_cosine_similarity(emb_, emb)  # brain, clip
            fwds.append(top1(fwd_sim, labels))
            bwds.append(top1(bwd_sim, labels))
    finally:
        np.random.set_state(state)
    return float(np.mean(fwds)), float(np.mean(bwds))


def test_image_retrieval_asks_which_brain_embedding_fits_each_image():
    """Brain embedding 0 copies image 1 exactly, the others are their image plus a little noise. Brain side:
    only brain 0 misses. Image side: image 0 misses (its brain embedding is image 1's) and so does image 1
    (brain 0 is closer to it than its own brain 1): image retrieval 298/300, brain retrieval 299/300."""
    g = torch.Generator().manual_seed(5)
    image = torch.randn(300, 64, generator=g, dtype=torch.float64)
    brain = image + 0.1 * torch.randn(300, 64, generator=g, dtype=torch.float64)
    brain[0] = image[1]
    metric = Retrieval(n_subsets=1)  # 300 items: the one subset holds them all
    metric.update(brain_embeds=brain, image_embeds=image)
    result = metric.compute()
    assert result["retrieval_image"].item() == pytest.approx(298 / 300)
    assert result["retrieval_brain"].item() == pytest.approx(299 / 300)
    assert retrieval_loop(brain.numpy(), image.numpy()) == pytest.approx((298 / 300, 299 / 300))


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
    # hits / 300 per subset; MindEye2's topk divides in float32, hence 1e-6 rather than exact
    assert result["retrieval_image"].item() == pytest.approx(fwd, abs=1e-6)
    assert result["retrieval_brain"].item() == pytest.approx(bwd, abs=1e-6)
    assert 0.05 < fwd < 0.95 and fwd != bwd
    swapped = retrieval_loop(image.double().numpy(), brain.double().numpy())  # the old, swapped reading
    assert swapped != pytest.approx((fwd, bwd), abs=1e-3)


def test_default_subsets_are_mindeye2s():
    """seed 42 from a fresh RandomState draws what np.random.seed(42) + np.random.choice draw."""
    from brainit_pl.metrics.retrieval import RETRIEVAL_SEED

    assert RETRIEVAL_SEED == 42
    state = np.random.get_state()
    np.random.seed(42)
    theirs = [np.random.choice(np.arange(1000), size=300, replace=False) for _ in range(30)]
    np.random.set_state(state)
    ours = np.random.RandomState(RETRIEVAL_SEED)
    assert all(np.array_equal(ours.choice(1000, size=300, replace=False), t) for t in theirs)


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
