"""The MindEye2-style feature decoder the BIT is compared with on held-out feature prediction.

:class:`MindEye2Decoder` (MindEye2, Scotti et al. 2024): a per-subject linear map of the voxels into a
shared latent, MindEye2's residual MLP backbone, and a token head. It takes the BIT's input (activations
at global voxel ids, all voxels or a sample) and decodes any subset of the output tokens. The other
baseline, ridge regression, is :mod:`brainit_pl.models.ridge`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainit_pl.errors import require

# ------------------------------------------------------------------------------------------- MindEye2


class ResidualMLP(nn.Module):
    """MindEye2's backbone block: x + Linear(Dropout(GELU(Linear(LN(x)))))."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MindEye2's per-token projector (its ``clip_proj``): three (LayerNorm, GELU, Linear) stages."""
    return nn.Sequential(
        *(nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, hidden)),
        *(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden)),
        *(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim)),
    )


class MindEye2Decoder(nn.Module):
    """MindEye2-style decoder: (B, V) activations at global voxel ids → (B, N_out | Q, out_dim) tokens.

    1. **Per-subject linear map** (MindEye2's ``nn.Linear(V_s, latent)`` per subject) stored as one row
       w_v per global voxel plus a bias per subject: z = (V_s / k) Σ_j x_j w_{v_j} + b_s over the k given
       voxels. With all V_s voxels this is exactly x @ W_s + b_s; with k voxels drawn uniformly it is an
       unbiased estimate of it (a voxel-dropout regulariser, as the BIT's voxel sampling). The V_s / k
       factor (rather than a plain mean) keeps nn.Linear's scale, so MindEye2's init and learning rates
       carry over. The sum is ``F.embedding_bag`` (no (B, k, latent) tensor is built).
    2. **Backbone**: ``n_blocks`` residual MLP blocks of width ``latent`` (MindEye2's ``mixer_blocks1``;
       its token-mixing blocks act on a sequence of length 1 in MindEye2 and are left out).
    3. **Token head** (choice): MindEye2's backbone ends in one Linear(latent, N_out · out_dim) — 1.7 B
       weights at 256 × 1664, 15 B at 7,190 × 512 — which cannot decode a subset of the tokens cheaply.
       Here each output token q reads the latent through a factorised per-position linear map:
       h_q = (U z) ⊙ g_q + p_q with a shared U (latent → query_dim), a learned gain g_q and a learned
       position embedding p_q, then MindEye2's per-token projector MLP (query_dim → out_dim). The gains
       give every position its own linear read-out of the shared code (a CP-factorised version of the
       per-position weights), the embeddings its own offset. Only the requested positions are computed.

    Args:
        n_voxels: subject → voxel count V_s (sets the voxel table: subjects in sorted order, as the
            DataModule's global voxel ids).
        n_out: N_out output tokens (256 CLIP, 7,190 VGG).
        out_dim: width of each output token (1664 CLIP, 512 VGG).
        latent: width of the shared latent and the backbone (MindEye2: 4096).
        n_blocks: residual MLP blocks (MindEye2: 4).
        query_dim: width of the per-token code h_q.
        dropout: dropout inside the backbone blocks (MindEye2: 0.15).
        head_dim: hidden width of the projector (default ``out_dim``, as MindEye2's ``clip_proj``).
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        n_out: int,
        out_dim: int,
        latent: int = 4096,
        n_blocks: int = 4,
        query_dim: int = 256,
        dropout: float = 0.15,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        require(bool(n_voxels), "MindEye2Decoder needs at least one subject in n_voxels")
        for name, value in (
            ("n_out", n_out),
            ("out_dim", out_dim),
            ("latent", latent),
            ("query_dim", query_dim),
        ):
            require(value >= 1, f"MindEye2Decoder.{name} must be at least 1, got {value}")
        require(n_blocks >= 0, f"MindEye2Decoder.n_blocks must be >= 0, got {n_blocks}")
        self.n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
        self.n_out, self.out_dim = n_out, out_dim
        counts = list(self.n_voxels.values())  # Python ints: building on the meta device works too
        # Lookups from a global voxel id to its subject's row and size (data, not weights: non-persistent).
        subject_of_voxel = torch.repeat_interleave(
            torch.arange(len(counts)), torch.tensor(counts), output_size=sum(counts)
        )
        self.register_buffer("subject_of_voxel", subject_of_voxel, persistent=False)  # (V_total,)
        self.register_buffer("voxels_of_subject", torch.tensor(counts, dtype=torch.float32), persistent=False)
        self.voxel_embed = nn.Parameter(torch.empty(sum(counts), latent))
        self.subject_bias = nn.Parameter(torch.empty(len(counts), latent))
        with torch.no_grad():  # nn.Linear(V_s, latent)'s default init, U(±1/√V_s), per subject
            for i, (rows, count) in enumerate(zip(torch.split(self.voxel_embed, counts), counts)):
                bound = 1 / math.sqrt(count)
                rows.uniform_(-bound, bound)
                self.subject_bias[i].uniform_(-bound, bound)
        self.blocks = nn.ModuleList(ResidualMLP(latent, dropout) for _ in range(n_blocks))
        self.to_query = nn.Linear(latent, query_dim)
        self.query_gain = nn.Parameter(torch.ones(n_out, query_dim))
        self.query_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_out, query_dim), std=0.02))
        self.head = projector(query_dim, head_dim or out_dim, out_dim)

    def pool(self, x: Tensor, voxel_ids: Tensor) -> Tensor:
        """The per-subject linear map: (B, k) activations at (B, k) global ids → (B, latent).

        Every row must hold voxels of one subject (not checked: it would sync the GPU every step).
        """
        require(
            x.shape == voxel_ids.shape and x.ndim == 2,
            f"MindEye2Decoder expects x and voxel_ids of the same (B, V) shape, got {tuple(x.shape)} and "
            f"{tuple(voxel_ids.shape)}",
        )
        weights = self.voxel_embed
        summed = F.embedding_bag(voxel_ids, weights, per_sample_weights=x.to(weights.dtype), mode="sum")
        subject = self.subject_of_voxel[voxel_ids[:, 0]]  # (B,)
        scale = self.voxels_of_subject[subject] / voxel_ids.shape[1]  # (B,) V_s / k
        return summed * scale[:, None].to(summed.dtype) + self.subject_bias[subject]  # (B, latent)

    def forward(self, x: Tensor, voxel_ids: Tensor, query_ids: Tensor | None = None) -> Tensor:
        """Predicted image tokens.

        Args:
            x: (B, V) activations of the given voxels.
            voxel_ids: (B, V) their global voxel ids (one subject per row).
            query_ids: (B, Q) output positions to decode per sample, or None for all N_out.

        Returns:
            (B, N_out, out_dim), or (B, Q, out_dim) with ``query_ids``.
        """
        z = self.pool(x, voxel_ids)
        for block in self.blocks:
            z = block(z)
        code = self.to_query(z)[:, None]  # (B, 1, Dq)
        if query_ids is None:
            gain, embed = self.query_gain[None], self.query_embed[None]  # (1, N_out, Dq)
        else:
            require(
                query_ids.ndim == 2 and len(query_ids) == len(x),
                f"query_ids must be (B={len(x)}, Q), got {tuple(query_ids.shape)}",
            )
            gain, embed = self.query_gain[query_ids], self.query_embed[query_ids]  # (B, Q, Dq)
        return self.head(code * gain + embed)  # (B, N_out | Q, out_dim)
