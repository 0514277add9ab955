"""The Brain Tokenizer's graph attention (docs/method.md §4): one token per V2C cluster, pooled from its voxels.

Written as a segment softmax in plain torch over the voxel-embedding table, without materialising the
(B, V, D) voxel tokens (:class:`ClusterGraphAttention`; the dense form is kept for tests and benchmarks).
Used by :class:`~brainit_pl.models.bit.BIT`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def first_occurrence(ids: Tensor) -> Tensor:
    """Mask of the first occurrence of each id within each row, so duplicates count once.

    A stable sort puts equal ids next to each other in their original order; an entry is kept when it
    differs from its left neighbour in sorted order. Sampling with replacement repeats a voxel with the
    same activation, so which copy is kept does not change the result.

    Args:
        ids: (B, V) integer ids.

    Returns:
        (B, V) bool, True at the first copy of every id of its row.
    """
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)  # (B, V)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)  # (B, V)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return torch.empty_like(new).scatter_(1, order, new)  # back to the input order


class ClusterGraphAttention(nn.Module):
    """Single-head graph attention on the bipartite graph voxel v → its cluster k(v), with a root weight.

    B_k = W_skip c_k + Σ_{v ∈ k} softmax_v((W_q c_k)·(W_k t_v)/√D) W_v t_v with t_v = x_v e_v —
    torch_geometric's ``TransformerConv(heads=1, root_weight=True)`` as the authors use it, written as a
    segment softmax in plain torch to avoid a torch_scatter/torch_geometric dependency for one layer.
    Duplicate voxels of a sample count once; a cluster with no voxel in a sample gets W_skip c_k.

    :meth:`forward` never builds a (B, V, D) tensor. The projections are affine and t_v is a scalar times
    a table row, so with q_k = W_q c_k + b_q, u_k = W_kᵀ q_k and β_k = q_k·b_k:

        logit_v = q_k·(W_k t_v + b_k)/√D = (x_v (u_k·e_v) + β_k)/√D      — (B, V) work, u_k·e_v per table row
        Σ_v a_v (W_v t_v + b_v) = W_v (Σ_v a_v x_v e_v) + b_v Σ_v a_v    — Σ_v a_v x_v e_v by embedding_bag

    :meth:`forward_dense` is the direct (B, V, D) form, kept as the reference the tests and
    ``benchmarks/bit.py`` compare against.

    Args:
        dim: width D.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin_key, self.lin_query = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.lin_value, self.lin_skip = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, voxel_ids: Tensor, embed: Tensor, cluster_of_voxel: Tensor, centers: Tensor
    ) -> Tensor:
        """Pool the voxels of each cluster into one token, in O(B·V + N·D + B·K·D) memory.

        Args:
            x: (B, V) activations x_v.
            voxel_ids: (B, V) rows of ``embed``; a repeated id within a row counts once (same x assumed).
            embed: (N, D) voxel embedding table e (all subjects).
            cluster_of_voxel: (N,) cluster of every table row, in [0, K).
            centers: (K, D) cluster embeddings c_k.

        Returns:
            (B, K, D) brain tokens before the ReLU.
        """
        b, (n, d), k = x.shape[0], embed.shape, centers.shape[0]
        # One sort per sample groups its entries by cluster, the bags of embedding_bag, and puts equal ids
        # side by side inside a cluster, so the duplicates fall out of the same pass; stable, so the copy
        # that counts is the first, as in first_occurrence. Flattened, the entries are in (sample,
        # cluster, id) order. (Per sample: a 1-D sort of all B·V keys is much slower on CPU.)
        key, order = torch.sort(cluster_of_voxel[voxel_ids] * n + voxel_ids, dim=1, stable=True)  # (B, V)
        sample = torch.arange(b, device=x.device)[:, None]  # (B, 1)
        seg, ids = (key // n + k * sample).flatten(), (key % n).flatten()  # (B·V,): segment b·K + k, id
        keep = torch.ones_like(key, dtype=torch.bool)  # (B, V): first copy of each id of a sample
        keep[:, 1:] = key[:, 1:] != key[:, :-1]
        # Scores, softmax and the weighted sum run in the parameters' precision (float32) even under
        # bf16/fp16 autocast: a cluster's sum over hundreds of voxels would lose precision, and the
        # matmuls here are small.
        with torch.autocast(x.device.type, enabled=False):
            xs = torch.gather(x, 1, order).flatten().to(embed.dtype)  # (B·V,)
            q = self.lin_query(centers)  # (K, D)
            u, beta = q @ self.lin_key.weight, q @ self.lin_key.bias  # (K, D), (K,)
            # u_k·e_n for every table row n and its own cluster k(n), a batch-independent cost. One
            # (N, D) × (D, K) matmul and a gather: autograd keeps an (N, K) tensor at most, where
            # (embed * u[cluster_of_voxel]).sum(-1) would keep an (N, D) gather until the backward.
            score = (embed @ u.T).gather(1, cluster_of_voxel[:, None]).squeeze(1)  # (N,)
            logits = (xs * score[ids] + beta[seg % k]) / math.sqrt(d)  # (B·V,)
            logits = logits.masked_fill(~keep.flatten(), float("-inf"))
            # Segment softmax: subtract each segment's max for stability, as torch_geometric does; the
            # softmax does not depend on that shift, so it is detached (no gradient through the max).
            peak = logits.new_full((b * k,), float("-inf"))
            peak = peak.scatter_reduce(0, seg, logits, reduce="amax", include_self=True)  # (B·K,)
            weight = torch.exp(logits - peak[seg].detach())  # (B·V,), 0 at dropped copies
            total = weight.new_zeros(b * k).index_add_(0, seg, weight)  # (B·K,), ≥ 1 unless empty
            attn = weight / total[seg]  # (B·V,) a_v
            # Σ_v a_v x_v e_v per segment: embedding_bag reads the rows of ``embed`` in place, in forward
            # and backward, where gathering them would cost (B·V, D). An empty bag sums to 0.
            offsets = torch.searchsorted(seg, torch.arange(b * k, device=x.device))  # (B·K,) bag starts
            mix = F.embedding_bag(ids, embed, offsets, mode="sum", per_sample_weights=attn * xs)  # (B·K, D)
        # W_v mix + b_v Σ_v a_v: the softmax sums to 1 over a non-empty cluster and an empty one has no
        # term at all, so the value bias is added to the non-empty clusters only (as in the dense form).
        pooled = self.lin_value(mix).masked_fill((total == 0)[:, None], 0)  # (B·K, D)
        return pooled.view(b, k, d) + self.lin_skip(centers)  # (B, K, D)

    def forward_dense(self, tokens: Tensor, clusters: Tensor, keep: Tensor, centers: Tensor) -> Tensor:
        """The direct form of :meth:`forward` on materialised voxel tokens: (B, V, D) keys and values.

        The tests and the benchmark compare against it; it also lets a caller choose which copies count.

        Args:
            tokens: (B, V, D) voxel tokens t_v.
            clusters: (B, V) cluster k(v) of each voxel, in [0, K).
            keep: (B, V) bool, False for voxels that must not count (duplicates).
            centers: (K, D) cluster embeddings c_k.

        Returns:
            (B, K, D) brain tokens before the ReLU.
        """
        b, v, d = tokens.shape
        k = centers.shape[0]
        q = self.lin_query(centers)  # (K, D)
        keys, values = self.lin_key(tokens), self.lin_value(tokens)  # (B, V, D) each
        # The segment softmax and its sums run in float32: under bf16/fp16 autocast a cluster's sum over
        # hundreds of voxels would lose precision.
        logits = (q[clusters] * keys).sum(-1).float() / math.sqrt(d)  # (B, V)
        logits = logits.masked_fill(~keep, float("-inf"))
        segment = (clusters + k * torch.arange(b, device=clusters.device)[:, None]).flatten()  # (B·V,)
        peak = logits.new_full((b * k,), float("-inf"))
        peak = peak.scatter_reduce(0, segment, logits.flatten(), reduce="amax", include_self=True)  # (B·K,)
        weight = torch.exp(logits.flatten() - peak[segment].detach())  # (B·V,), 0 at dropped voxels
        total = weight.new_zeros(b * k).index_add_(0, segment, weight)  # (B·K,)
        pooled = weight.new_zeros(b * k, d)
        pooled = pooled.index_add_(0, segment, weight[:, None] * values.reshape(-1, d).float())  # (B·K, D)
        # An empty cluster has total 0 and pooled 0: the clamp makes its sum 0 instead of NaN.
        pooled = pooled / total.clamp_min(1e-16)[:, None]  # (B·K, D)
        return pooled.view(b, k, d).to(values.dtype) + self.lin_skip(centers)  # (B, K, D)
