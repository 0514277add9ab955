"""Stage-1 losses of the two BITs (docs/method.md §5).

- Semantic BIT: MSE on all 256 × 1664 CLIP tokens.
- Low-level BIT: symmetric InfoNCE per VGG scale on the sampled token positions, with raw dot-product
  logits (no normalisation, temperature 1), averaged over the scales. ``tests/data/brainit_reference.npz``
  (keys ``infonce/...``) pins the convention.

Both are computed in float32 whatever the autocast around them: the raw logits are dot products of 512-d
VGG tokens, in the hundreds to thousands, where bfloat16 (8 bits of mantissa) would round them by several
units; the MSE compares float16-cached CLIP targets in float32 too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from brainit_pl.errors import require


def semantic_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every token and channel.

    Args:
        pred: (B, T, D) predicted CLIP tokens.
        target: (B, T, D) the images' CLIP tokens (cached, possibly float16: compared in float32).

    Returns:
        () the loss.
    """
    require(
        pred.shape == target.shape, f"semantic_mse: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
    )
    return F.mse_loss(pred.float(), target.float())


def symmetric_infonce(pred: Tensor, target: Tensor) -> Tensor:
    """Symmetric InfoNCE between matching rows, raw dot-product logits.

    Args:
        pred: (N, D) predictions; row i matches ``target`` row i, every other row is a negative.
        target: (N, D) targets.

    Returns:
        () float32 (CE(logits, diag) + CE(logitsᵀ, diag)) / 2 with logits = pred @ targetᵀ, computed in
        float32 even under autocast (module docstring).
    """
    with torch.autocast(pred.device.type, enabled=False):
        logits = pred.float() @ target.float().T  # (N, N)
    labels = torch.arange(len(pred), device=pred.device)  # (N,): the diagonal
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def infonce_per_scale(pred: Tensor, target: Tensor, tokens_per_scale: Sequence[int]) -> Tensor:
    """Low-level loss: symmetric InfoNCE within each scale, averaged over scales.

    Tokens of one scale are contrasted with each other across the whole batch (batch × tokens rows), never
    with another scale's tokens.

    Args:
        pred: (B, T, D) predicted tokens at the sampled positions, scale by scale along T
            (real model: T = 512 + 512 + 128 + 64 + 16).
        target: (B, T, D) the VGG tokens at the same positions.
        tokens_per_scale: sampled tokens of each scale; they sum to T.

    Returns:
        () the loss.
    """
    sizes = [int(n) for n in tokens_per_scale]
    require(
        pred.shape == target.shape and pred.ndim == 3,
        f"infonce_per_scale: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be one (B, T, D)",
    )
    require(
        all(n >= 1 for n in sizes) and sum(sizes) == pred.shape[1],
        f"infonce_per_scale: tokens_per_scale {sizes} must be positive and sum to T={pred.shape[1]}",
    )
    losses = [
        symmetric_infonce(p.reshape(-1, p.shape[-1]), t.reshape(-1, t.shape[-1]))  # (B·T_s, D) rows
        for p, t in zip(pred.split(sizes, dim=1), target.split(sizes, dim=1))
    ]
    return torch.stack(losses).mean()
