"""MindEye's retrieval metric: find the right brain embedding for an image (and back) among 300.

MindEye2 (``final_evaluations``, after ``utils.seed_everything(42)``): 30 times, draw 300 test items with
``np.random.choice(np.arange(N), size=300, replace=False)`` from numpy's global random state, L2-normalise
both sets of embeddings, take cosine similarities, and count top-1 hits; report the mean over the 30
subsets. Their ``batchwise_cosine_similarity(Z, B)`` returns ``(Z @ B.T).T``, so ``fwd_sim =
batchwise_cosine_similarity(brain, image)`` has one row per *image*, and ``topk`` scores each row: what
MindEye2 publishes as forward or *image retrieval* is, for each image, whether its own brain embedding is
the most similar of the 300; *brain retrieval* (backward) is, for each brain embedding, whether its own
image is. We draw the subsets from ``np.random.RandomState(seed)`` with seed 42 by default: the legacy
global state seeded with 42 yields the same 30 subsets, since nothing else draws from it in between, as
long as the items come in MindEye2's order (after a multi-device sync the order is rank by rank).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from brainit_pl.metrics.image import InvalidInputError, is_empty
from brainit_pl.metrics.protocols import RETRIEVAL_SEED, SUBSET_SIZE

N_SUBSETS = 30


def retrieval_top1(
    brain: Tensor,
    image: Tensor,
    n_subsets: int = N_SUBSETS,
    subset_size: int = SUBSET_SIZE,
    seed: int = RETRIEVAL_SEED,
) -> tuple[Tensor, Tensor]:
    """Top-1 retrieval accuracy in both directions, averaged over random subsets.

    Args:
        brain: (N, D) brain embeddings (flattened), N ≥ ``subset_size``.
        image: (N, D) image embeddings of the same items, in the same order.
        n_subsets: number of random subsets.
        subset_size: items per subset (the number of candidates).
        seed: seed of the subset draws (42: MindEye2's subsets, given its item order).

    Returns:
        ``(image_retrieval, brain_retrieval)``, float64 scalars in [0, 1]: image retrieval is, for each
        image, whether its own brain embedding is the most similar (MindEye2's forward); brain retrieval is,
        for each brain embedding, whether its own image is (backward).
    """
    n = brain.shape[0]
    if n < subset_size:
        raise InvalidInputError(
            f"retrieval needs at least {subset_size} test items (it picks the right one among {subset_size}), "
            f"got {n}; evaluate on the full test set or leave retrieval out"
        )
    rng = np.random.RandomState(seed)
    brain = F.normalize(brain.double(), dim=-1)
    image = F.normalize(image.double(), dim=-1)
    labels = torch.arange(subset_size, device=brain.device)
    image_ret, brain_ret = [], []
    for _ in range(n_subsets):
        idx = torch.from_numpy(rng.choice(n, size=subset_size, replace=False)).to(brain.device)
        sim = image[idx] @ brain[idx].T  # (300 image, 300 brain) cosine similarities: MindEye2's fwd_sim
        image_ret.append(
            (sim.argmax(dim=1) == labels).double().mean()
        )  # each image: its own brain embedding?
        brain_ret.append((sim.T.argmax(dim=1) == labels).double().mean())  # each brain embedding: its image?
    return torch.stack(image_ret).mean(), torch.stack(brain_ret).mean()


class Retrieval(Metric):
    """Retrieval ↑ between brain-predicted embeddings and the image embeddings (MindEye protocol).

    ``compute`` returns ``{"retrieval_image": ..., "retrieval_brain": ...}``; both are NaN when no
    embeddings were given (so that a suite updated with images only still computes), and it raises with
    fewer than ``subset_size`` items.

    Args:
        n_subsets: random subsets to average over (30).
        subset_size: candidates per subset (300).
        seed: seed of the subset draws (42, MindEye2's).
        **kwargs: :class:`~torchmetrics.Metric` options.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        n_subsets: int = N_SUBSETS,
        subset_size: int = SUBSET_SIZE,
        seed: int = RETRIEVAL_SEED,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.n_subsets, self.subset_size, self.seed = n_subsets, subset_size, seed
        self.add_state("brain_embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("image_embeddings", default=[], dist_reduce_fx="cat")

    def update(self, brain_embeds: Tensor | None = None, image_embeds: Tensor | None = None) -> None:
        """Keep a batch of embedding pairs.

        Args:
            brain_embeds: (B, D) or (B, ...) embeddings predicted from the brain; ``None`` with
                ``image_embeds`` ``None`` is a no-op, so that a MetricCollection may be updated with images only.
            image_embeds: (B, D) or (B, ...) embeddings of the seen images, same flattened size.
        """
        if brain_embeds is None and image_embeds is None:
            return
        if brain_embeds is None or image_embeds is None:
            raise InvalidInputError("give both brain_embeds and image_embeds (or neither)")
        brain, image = brain_embeds.flatten(1), image_embeds.flatten(1)  # (B, D)
        if brain.shape != image.shape:
            raise InvalidInputError(
                f"brain_embeds {tuple(brain_embeds.shape)} and image_embeds {tuple(image_embeds.shape)} must "
                "hold the same number of items with the same embedding size"
            )
        self.brain_embeddings.append(brain.float())
        self.image_embeddings.append(image.float())

    def compute(self) -> dict[str, Tensor]:
        """``{"retrieval_image", "retrieval_brain"}``: top-1 accuracies in [0, 1] (NaN without embeddings)."""
        if is_empty(self.brain_embeddings):
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
            return {"retrieval_image": nan, "retrieval_brain": nan.clone()}
        image, brain = retrieval_top1(
            dim_zero_cat(self.brain_embeddings),
            dim_zero_cat(self.image_embeddings),
            n_subsets=self.n_subsets,
            subset_size=self.subset_size,
            seed=self.seed,
        )
        return {"retrieval_image": image, "retrieval_brain": brain}
