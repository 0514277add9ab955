"""BIT, the Brain Interaction Transformer (docs/method.md §4): fMRI voxels → brain tokens → image features.

1. Voxel tokens: t_v = x_v · e_v, a learned embedding per global voxel scaled by its activation.
2. Brain Tokenizer: one token per functional cluster k, pooled from the voxels of k by single-head graph
   attention with a root (skip) weight; ReLU; LayerNorm. The voxel tokens are never materialised: the
   attention is rewritten on x and the embedding table (``ClusterGraphAttention``), so its memory does not
   grow as B·V·D.
3. Cross-Transformer: self-attention blocks among the K brain tokens, interleaved with cross blocks in
   which learned output queries read the brain tokens; a linear head gives the image features.

Parameter names follow the Brain-IT reference (``voxel_embed``, ``centers``, ``pred_tokens``,
``conv_centers.lin_*``, ``norm_centers``, ``blocks.i.*``, ``block_crosses.i.*``, ``proj``), so its weights
load by name with ``strict=True``; ``tests/data/brainit_reference.npz`` (keys ``bit/...``) pins every
convention. Only ``voxel_embed`` is subject-specific; everything else is shared by all subjects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from brainit_pl.errors import require
from brainit_pl.models.tokenizer import ClusterGraphAttention


@dataclass(frozen=True)
class BITConfig:
    """The BIT's sizes. The voxel count is not here: the data decides it (``cluster_of_voxel``).

    Attributes:
        dim: width D of voxel, brain and query tokens (512).
        n_clusters: K brain tokens (128).
        n_heads: attention heads of the self and cross blocks (8).
        mlp_ratio: MLP hidden width as a multiple of D (4).
        n_self: self-attention blocks (5); there is always one cross block more than self blocks.
        n_out: output queries N_out (256 CLIP tokens, or 7,190 VGG tokens).
        out_dim: width of each output token (1664 CLIP, 512 VGG).
    """

    dim: int = 512
    n_clusters: int = 128
    n_heads: int = 8
    mlp_ratio: float = 4.0
    n_self: int = 5
    n_out: int = 256
    out_dim: int = 1664

    def __post_init__(self) -> None:
        for name in ("dim", "n_clusters", "n_heads", "n_out", "out_dim"):
            require(
                getattr(self, name) >= 1, f"BITConfig.{name} must be at least 1, got {getattr(self, name)}"
            )
        require(self.n_self >= 0, f"BITConfig.n_self must be >= 0, got {self.n_self}")
        require(self.mlp_ratio > 0, f"BITConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        require(
            self.dim % self.n_heads == 0,
            f"BITConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})",
        )

    @property
    def n_cross(self) -> int:
        """Cross blocks: one before the first self block, one after each."""
        return self.n_self + 1


BIT_SEMANTIC = BITConfig(n_out=256, out_dim=1664)  # 256 × 1664 OpenCLIP ViT-bigG/14 patch tokens
BIT_LOWLEVEL = BITConfig(n_out=7190, out_dim=512)  # 7,190 × 512 VGG16-BN tokens (docs/method.md §5)
BIT_TINY = BITConfig(dim=32, n_clusters=8, n_heads=4, n_self=2, n_out=10, out_dim=12)  # tests, CPU
BIT_REFERENCE = BITConfig(dim=32, n_clusters=5, n_heads=4, n_self=2, n_out=6, out_dim=7)  # the npz's sizes
PRESETS: dict[str, BITConfig] = {
    "semantic": BIT_SEMANTIC,
    "lowlevel": BIT_LOWLEVEL,
    "tiny": BIT_TINY,
    "reference": BIT_REFERENCE,
}


class SelfAttention(nn.Module):
    """Multi-head self-attention, qkv without bias, q|k|v stacked and heads split as (head, head_dim)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads)  # (B, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H), softmax(q·kᵀ/√(D/H))·v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class CrossAttention(nn.Module):
    """Queries read brain tokens: the queries enter unprojected; keys and values from one ``kv`` Linear."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        b, n, d = queries.shape
        h, hd = self.n_heads, d // self.n_heads
        q = queries.view(b, n, h, hd).transpose(1, 2)  # (B, H, N, D/H)
        kv = self.kv(context).view(b, context.shape[1], 2, h, hd)  # (B, K, 2, H, D/H)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, K, D/H)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class SelfBlock(nn.Module):
    """Pre-LN ViT block on the brain tokens: x + attn(LN(x)), then x + mlp(LN(x)) (exact GELU)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, n_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        """(B, K, D) → (B, K, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Cross block: y = proj(MHA(Q, kv(LN(B)))); y = y + mlp(LN(y)). Returns y; the caller adds it to Q."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), CrossAttention(dim, n_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, brain: Tensor, queries: Tensor) -> Tensor:
        """Brain tokens (B, K, D) and queries (B, N, D) → the update y (B, N, D)."""
        y = self.attn(queries, self.norm1(brain))
        return y + self.mlp(self.norm2(y))


class BIT(nn.Module):
    """Brain Tokenizer + Cross-Transformer: voxel activations → (B, N_out, out_dim) image features.

    Args:
        config: the sizes (a preset such as :data:`BIT_SEMANTIC`).
        cluster_of_voxel: (total_voxels,) V2C cluster of every global voxel (all subjects, global order as
            in :class:`~brainit_pl.models.v2c.ClusterMap`). A non-persistent buffer: the assignment is data
            (``clusters.npz``), given at construction like the voxel count, so checkpoints hold weights only.
        gradient_checkpointing: recompute the activations of each self and cross block in the backward
            pass instead of keeping them (training only). A module attribute, not part of the config, so
            weights and reference checkpoints load the same way with or without it.
    """

    def __init__(
        self, config: BITConfig, cluster_of_voxel: np.ndarray | Tensor, gradient_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        # Checked in numpy, so that building on the ``meta`` device (counting parameters) works too.
        labels = np.asarray(
            cluster_of_voxel.cpu() if isinstance(cluster_of_voxel, Tensor) else cluster_of_voxel
        )
        require(labels.ndim == 1 and len(labels) > 0, f"cluster_of_voxel must be (V,), got {labels.shape}")
        require(
            bool(((labels >= 0) & (labels < config.n_clusters)).all()),
            f"cluster_of_voxel holds labels outside [0, {config.n_clusters}) (BITConfig.n_clusters)",
        )
        labels = torch.as_tensor(labels, dtype=torch.long)
        self.config, d = config, config.dim
        self.register_buffer("cluster_of_voxel", labels, persistent=False)
        # docs/method.md §4: e_v ~ N(0, 1) · 0.1 / (2√D).
        self.voxel_embed = nn.Parameter(torch.randn(len(labels), d) * (0.1 / (2 * math.sqrt(d))))
        # (choice) cluster embeddings and output queries: truncated normal, std 0.02, as ViT embeddings.
        self.centers = nn.Parameter(nn.init.trunc_normal_(torch.empty(config.n_clusters, d), std=0.02))
        self.pred_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(config.n_out, d), std=0.02))
        self.conv_centers = ClusterGraphAttention(d)
        self.norm_centers = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            SelfBlock(d, config.n_heads, config.mlp_ratio) for _ in range(config.n_self)
        )
        self.block_crosses = nn.ModuleList(
            CrossBlock(d, config.n_heads, config.mlp_ratio) for _ in range(config.n_cross)
        )
        self.proj = nn.Linear(d, config.out_dim)

    def tokenize(self, x: Tensor, voxel_ids: Tensor) -> Tensor:
        """Brain tokens of a batch.

        Args:
            x: (B, V) activations of the sampled voxels.
            voxel_ids: (B, V) their global voxel ids; a repeated id counts once (same activation assumed).

        Returns:
            (B, K, D) brain tokens after ReLU and LayerNorm.
        """
        require(
            x.shape == voxel_ids.shape and x.ndim == 2,
            f"BIT expects x and voxel_ids of the same (B, V) shape, got {tuple(x.shape)} and "
            f"{tuple(voxel_ids.shape)}",
        )
        # t_v = x_v · e_v is never materialised: the tokenizer works on x and the table directly.
        brain = self.conv_centers(x, voxel_ids, self.voxel_embed, self.cluster_of_voxel, self.centers)
        return self.norm_centers(F.relu(brain))  # (B, K, D)

    def forward(self, x: Tensor, voxel_ids: Tensor, query_ids: Tensor | None = None) -> Tensor:
        """Predicted image tokens.

        Args:
            x: (B, V) activations of the sampled voxels.
            voxel_ids: (B, V) their global voxel ids.
            query_ids: (B, Q) output tokens to decode per sample (the low-level loss samples positions),
                or None for all N_out.

        Returns:
            (B, N_out, out_dim), or (B, Q, out_dim) with ``query_ids``.
        """
        brain = self.tokenize(x, voxel_ids)  # (B, K, D)
        if query_ids is None:
            queries = self.pred_tokens.expand(len(x), -1, -1)  # (B, N_out, D)
        else:
            require(
                query_ids.ndim == 2 and len(query_ids) == len(x),
                f"query_ids must be (B={len(x)}, Q), got {tuple(query_ids.shape)}",
            )
            queries = self.pred_tokens[query_ids]  # (B, Q, D)
        queries = queries + self._run(self.block_crosses[0], brain, queries)
        for block, cross in zip(self.blocks, self.block_crosses[1:]):
            brain = self._run(block, brain)
            queries = queries + self._run(cross, brain, queries)
        return self.proj(queries)

    def _run(self, block: nn.Module, *inputs: Tensor) -> Tensor:
        """``block(*inputs)``, through activation checkpointing when it is on and gradients are recorded."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant, as torch recommends: it handles inputs that do not require grad and replays
            # the forward's autocast state in the recomputation.
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    @torch.no_grad()
    def init_voxels_from(self, target_ids: Tensor, source_ids: Tensor) -> None:
        """Copy voxel embeddings from source rows to target rows, e_target ← e_source.

        Initialises a new subject's voxels from their nearest reference voxels (docs/method.md §3, §7), which
        trains better than the random init. The cluster of each voxel is not touched: it comes from V2C
        (the same nearest neighbour) through ``cluster_of_voxel`` at construction.

        Args:
            target_ids: (M,) global ids of the voxels to initialise, each at most once.
            source_ids: (M,) global ids whose embeddings they take. All sources are read before any target
                is written, so a row may be both.
        """
        target, source = torch.as_tensor(target_ids), torch.as_tensor(source_ids)
        n = len(self.voxel_embed)
        require(
            target.ndim == 1 and target.shape == source.shape,
            f"init_voxels_from expects target_ids and source_ids of the same (M,) shape, got "
            f"{tuple(target.shape)} and {tuple(source.shape)}",
        )
        for name, ids in (("target_ids", target), ("source_ids", source)):
            require(
                not ids.is_floating_point() and not ids.is_complex(),
                f"init_voxels_from: {name} must hold integer ids, got {ids.dtype}",
            )
            require(
                bool(((ids >= 0) & (ids < n)).all()),
                f"init_voxels_from: {name} holds ids outside [0, {n}) (the voxel table's rows)",
            )
        require(
            len(torch.unique(target)) == len(target),
            "init_voxels_from: target_ids repeats an id, so its source would be ambiguous",
        )
        device = self.voxel_embed.device
        # the right side is a gather (a copy), so overlapping sources and targets read the old rows
        self.voxel_embed[target.to(device)] = self.voxel_embed[source.to(device)]


def count_parameters(module: nn.Module, exclude: tuple[str, ...] = ("voxel_embed",)) -> int:
    """Number of parameters of ``module``, leaving out the named ones (by default the voxel table)."""
    return sum(p.numel() for name, p in module.named_parameters() if name not in exclude)
