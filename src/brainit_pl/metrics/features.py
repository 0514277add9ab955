"""How well a model predicts image features from fMRI, before any image is generated.

Two numbers, logged by every feature decoder (BIT, the MindEye2-style and the ridge baselines) under the
same names, so their runs compare directly in TensorBoard and in ``benchmarks/bit_vs_baselines.py``:

* ``clip_cos``: the mean over images and tokens of the cosine between predicted and true CLIP tokens;
* ``clip_2way``: two-way identification on the CLIP tokens (at a fixed, seeded 64 of the 256 positions: the
  cosine is dominated by what all images share, identification says whether the prediction is *this* image's);
* ``vgg_2way``: two-way identification (:func:`~brainit_pl.metrics.identification.two_way_identification`)
  between predicted and true VGG tokens, each image's tokens flattened into one vector. All 7,190 × 512
  values per image would cost 15 MB an image to keep until ``compute``, so the vectors are taken at a
  fixed, seeded subset of token positions (:func:`eval_positions`, the same for every model and run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from brainit_pl.metrics.identification import two_way_identification, two_way_per_image
from brainit_pl.metrics.image import is_empty

# Token positions per VGG scale kept for vgg_2way (of 3136, 3025, 784, 196, 49 at 112²).
EVAL_TOKENS_PER_SCALE = (64, 64, 64, 32, 16)
CLIP_EVAL_TOKENS = 64  # of the 256 CLIP patch tokens, for clip_2way


def eval_positions(
    counts: Sequence[int], per_scale: Sequence[int] = EVAL_TOKENS_PER_SCALE, seed: int = 0
) -> Tensor:
    """A fixed, seeded subset of token positions, ``per_scale[i]`` from each scale of ``counts`` tokens.

    Args:
        counts: tokens per scale (``VGGTokenLayout.counts``), concatenated in this order.
        per_scale: positions to keep per scale (capped at the scale's size).
        seed: seed of the draw (the default keeps every run and model on the same positions).

    Returns:
        (P,) int64 sorted positions into the concatenated token sequence.
    """
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0, *counts[:-1]])
    picks = [
        offset + np.sort(rng.choice(count, size=min(n, count), replace=False))
        for offset, count, n in zip(offsets, counts, per_scale, strict=True)
    ]
    return torch.from_numpy(np.concatenate(picks).astype(np.int64))


def token_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of cos(pred, target): (B, T, D) × 2 → (B,) float32."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(dim=1)


class TokenCosine(Metric):
    """Mean token cosine over all images seen (sums, so it syncs across devices).

    Each image's own cosine is kept too (a ``cat`` state, one float per image) for :meth:`per_image`.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add (B, T, D) predicted and true tokens."""
        cos = token_cosine(pred.detach(), target.detach())  # (B,)
        self.total += cos.double().sum()
        self.count += len(cos)
        self.values.append(cos)

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()

    def per_image(self) -> Tensor:
        """(N,) float64: each image's mean token cosine, in update order; the mean is :meth:`compute`."""
        if is_empty(self.values):
            return torch.zeros(0, dtype=torch.float64)
        return dim_zero_cat(self.values).double()


class TokenTwoWay(Metric):
    """Two-way identification on flattened token vectors (``cat`` states: every pair is needed at the end).

    Args:
        positions: (P,) token positions to keep (:func:`eval_positions`), or ``None`` for all tokens.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, positions: Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.positions = positions
        self.add_state("pred", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add (B, T, D) predicted and true tokens (all T positions; the kept ones are selected here)."""
        if self.positions is not None:
            pos = self.positions.to(pred.device)
            pred, target = pred[:, pos], target[:, pos]  # (B, P, D)
        self.pred.append(pred.detach().flatten(1).float())
        self.target.append(target.detach().flatten(1).float())

    def compute(self) -> Tensor:
        pred, target = dim_zero_cat(self.pred), dim_zero_cat(self.target)
        if len(pred) < 2:
            return torch.tensor(float("nan"))
        return two_way_identification(target, pred).float()

    def per_image(self) -> Tensor:
        """(N,) float64: per image, the fraction of the other N − 1 images of the pool it is told apart from
        (:func:`~brainit_pl.metrics.identification.two_way_per_image`), in update order; the mean is
        :meth:`compute`. NaN for a pool of fewer than 2 images."""
        if is_empty(self.pred):
            return torch.zeros(0, dtype=torch.float64)
        pred, target = dim_zero_cat(self.pred), dim_zero_cat(self.target)
        if len(pred) < 2:
            return torch.full((len(pred),), float("nan"), dtype=torch.float64)
        return two_way_per_image(target, pred)


class SampleKeys(Metric):
    """The (subject, nsd_id) of every sample seen, in update order (``cat`` states: they gather across
    devices in the same order as the quality metrics' states, so row k names the k-th per-image value)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("subject", default=[], dist_reduce_fx="cat")
        self.add_state("nsd_id", default=[], dist_reduce_fx="cat")

    def update(self, subject: Tensor, nsd_id: Tensor) -> None:
        """Add a batch's (B,) subjects and (B,) NSD image ids."""
        self.subject.append(subject.detach().long().reshape(-1))
        self.nsd_id.append(nsd_id.detach().long().reshape(-1))

    def compute(self) -> Tensor:
        """(N, 2) int64: (subject, nsd_id) per sample."""
        if is_empty(self.subject):
            return torch.zeros(0, 2, dtype=torch.long)
        return torch.stack([dim_zero_cat(self.subject), dim_zero_cat(self.nsd_id)], dim=1)


def per_image_quality(quality: MetricCollection, keys: SampleKeys) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-image values of a :func:`feature_quality` collection, gathered from every device.

    Collective under DDP (every rank must call it); each metric's states are restored afterwards, so the
    collection still computes (and logs) as usual.

    Returns:
        ``(keys, values)``: (N, 2) int64 (subject, nsd_id) per sample, and metric name (without the
        collection's prefix) → (N,) float64 per-image values in the same order.
    """
    key_rows = keys.compute()  # compute syncs (and restores) by itself
    values = {}
    for name, metric in quality.items():
        with metric.sync_context(should_unsync=True):  # per_image is not wrapped: sync here
            values[name.rsplit("/", 1)[-1]] = metric.per_image().cpu()
    return key_rows.cpu(), values


def feature_quality(branch: str, prefix: str, n_tokens: int = 256) -> MetricCollection:
    """The quality metrics of a branch, logged as ``{prefix}clip_cos`` / ``clip_2way`` or ``{prefix}vgg_2way``.

    ``update(pred, target)`` takes (B, T, D) tokens: all CLIP tokens, or the VGG tokens at the
    :func:`eval_positions` (the caller selects them, so a model may decode only those queries).
    """
    if branch == "semantic":
        positions = eval_positions([n_tokens], per_scale=[CLIP_EVAL_TOKENS])
        metrics = {"clip_cos": TokenCosine(), "clip_2way": TokenTwoWay(positions)}
    else:
        metrics = {"vgg_2way": TokenTwoWay()}
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
