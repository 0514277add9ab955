"""The Universal Brain Encoder's per-voxel readout (docs/method.md §2).

Every voxel v owns an embedding e_v. For each tapped backbone layer, the voxel queries that layer's tokens
with its own attention (query from e_v, keys from the tokens plus a positional embedding, softmax without
1/√d), pools the tokens into one vector, and refines it (LayerNorm, dropout, residual MLP). The pooled
vectors of all layers are concatenated to f (L·C) and read out with voxel-specific weights
W_v = e_v · F: ŷ_v = Σ_c f_c (W_v)_c.

Parameter names follow the Brain-IT reference (``voxel_embed``, ``feat_embed``, ``pos_embed``,
``map_att.i.project``, ``map_att.i.project_x``, ``norm.i``, ``mlp.i.fc1``/``fc2``), so its weights load
by name; ``tests/data/brainit_reference.npz`` (keys ``encoder/...``) pins the computation.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from brainit_pl.errors import require


class VoxelQuery(nn.Module):
    """One layer's voxel-to-token attention: queries from voxel embeddings, keys from the tokens.

    Args:
        embed_dim: voxel embedding width E.
        token_dim: token width C.
    """

    def __init__(self, embed_dim: int, token_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(embed_dim, embed_dim)  # e_v → query
        self.project_x = nn.Linear(token_dim, embed_dim)  # token → key

    def forward(self, voxels: Tensor, tokens: Tensor, pos_embed: Tensor) -> Tensor:
        """Attention weights of each voxel over the tokens.

        Args:
            voxels: (B, V, E) voxel embeddings.
            tokens: (B, T, C) the layer's tokens.
            pos_embed: (T, E) positional embedding added to the keys.

        Returns:
            (B, V, T), rows summing to 1.
        """
        q = self.project(voxels)  # (B, V, E)
        k = self.project_x(tokens) + pos_embed  # (B, T, E)
        # No 1/√E scaling, as in the reference: the small initial voxel embeddings keep the logits small.
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (B, V, T)


class VoxelReadout(nn.Module):
    """Per-voxel readout of tapped backbone tokens: (B, L, T, C) tokens and voxel ids → (B, V) responses.

    Args:
        n_voxels: voxels in the global voxel table (all subjects), linked from the data.
        n_layers: tapped backbone layers L.
        n_tokens: tokens T per layer (257 for DINOv2 at 224²).
        token_dim: token width C after the encoder's input projection (128).
        embed_dim: voxel embedding width E (256).
        mlp_ratio: hidden width of the per-layer MLP as a multiple of C.
        dropout: dropout on the pooled vectors (training only).
    """

    def __init__(
        self,
        n_voxels: int,
        n_layers: int = 5,
        n_tokens: int = 257,
        token_dim: int = 128,
        embed_dim: int = 256,
        mlp_ratio: float = 4.0,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        require(
            n_voxels > 0 and n_layers > 0 and n_tokens > 0, "VoxelReadout needs voxels, layers and tokens"
        )
        self.n_layers, self.n_tokens, self.token_dim = n_layers, n_tokens, token_dim
        # docs/method.md §2: e_v ~ N(0, 1) · 0.1 / (2 · 16).
        self.voxel_embed = nn.Parameter(torch.randn(n_voxels, embed_dim) * (0.1 / (2 * 16)))
        # (choice) F and the positional embedding: truncated normal, std 0.02, as ViT embeddings.
        self.feat_embed = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(embed_dim, n_layers * token_dim), std=0.02)
        )
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_tokens, embed_dim), std=0.02))
        self.map_att = nn.ModuleList(VoxelQuery(embed_dim, token_dim) for _ in range(n_layers))
        self.norm = nn.ModuleList(nn.LayerNorm(token_dim) for _ in range(n_layers))
        # timm's Mlp (fc1 → GELU → fc2) has the reference's parameter names.
        hidden = int(token_dim * mlp_ratio)
        self.mlp = nn.ModuleList(Mlp(token_dim, hidden, act_layer=nn.GELU) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, voxel_ids: Tensor) -> Tensor:
        """Predicted responses of the chosen voxels.

        Args:
            tokens: (B, L, T, C) tapped-layer tokens, already normalised and projected.
            voxel_ids: (B, V) global voxel ids per sample, or (V,) shared by the batch.

        Returns:
            (B, V) predicted responses.
        """
        b, n_layers, n_tokens, dim = tokens.shape
        require(
            (n_layers, n_tokens, dim) == (self.n_layers, self.n_tokens, self.token_dim),
            f"VoxelReadout expects tokens (B, {self.n_layers}, {self.n_tokens}, {self.token_dim}), "
            f"got {tuple(tokens.shape)}",
        )
        if voxel_ids.ndim == 1:
            voxel_ids = voxel_ids.expand(b, -1)
        voxels = self.voxel_embed[voxel_ids]  # (B, V, E)
        pooled = []
        for i in range(n_layers):
            layer = tokens[:, i]  # (B, T, C)
            att = self.map_att[i](voxels, layer, self.pos_embed)  # (B, V, T)
            f = self.dropout(self.norm[i](att @ layer))  # (B, V, C)
            pooled.append(f + self.mlp[i](f))
        f = torch.cat(pooled, dim=-1)  # (B, V, L·C)
        weights = voxels @ self.feat_embed  # (B, V, L·C): W_v = e_v · F
        return (f * weights).sum(dim=-1)  # (B, V)
