"""The Universal Brain Encoder: image → the fMRI response of every voxel of every subject (docs/method.md §2).

A frozen DINOv2 ViT-L/14-reg (:func:`~brainit_pl.backbones.dinov2.build_dinov2`) gives the tokens of the
tapped blocks [1, 6, 12, 18, 24] (registers dropped: 257 tokens). Small trainable low-rank adapters run
beside each block (``block(x) + adapter(x)``), so the backbone can adapt without its 300M weights
training. Each tapped layer's tokens go through LayerNorm + Linear(1024 → 128); the per-voxel readout
(:class:`~brainit_pl.models.encoder_head.VoxelReadout`) lets every voxel attend to every layer with its own
256-d embedding e_v and reads the pooled vectors out with W_v = e_v · F.

One network serves all subjects: the only subject-specific part is the voxel embedding table, indexed by
*global* voxel ids (subjects stacked in sorted order, as the NSDDataModule numbers them). The table is the
attribute ``voxel_embed`` (an ``nn.Embedding`` sharing its weight with the readout), so a Lightning
checkpoint holds it as ``encoder.voxel_embed.weight``; the V2C clustering reads it from there.

The end of this module is about that layout, shared by the encoder and both BITs: :func:`voxel_offsets`,
:func:`move_voxel_ids` and :func:`grow_voxel_table` add a subject to a table (its rows go where its sorted
position puts them, so the rows of later subjects shift), and :class:`VoxelRows` trains only some subjects'
rows (transfer to a new subject, docs/method.md §7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainit_pl.backbones.dinov2 import DINOv2Tokens, build_dinov2
from brainit_pl.errors import require
from brainit_pl.models.encoder_head import VoxelReadout


class LowRankAdapter(nn.Module):
    """A residual branch beside one frozen block: x → scale · up(GELU(down(x))).

    (choice) The paper gives rank 7, scale 0.01 and a zero-initialised up-projection; the GELU between the
    projections follows AdaptFormer-style parallel adapters. Zero init makes the adapted backbone equal to
    the frozen one at the start of training.

    Args:
        dim: the block's width D.
        rank: bottleneck width r.
        scale: multiplier of the branch's output.
    """

    def __init__(self, dim: int, rank: int = 7, scale: float = 0.01) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) block input → (B, N, D) residual added to the block's output."""
        return self.scale * self.up(F.gelu(self.down(x)))


class LoRAAdapter(nn.Module):
    """The authors' adapter: LoRA on a block's *output*, x ← x + scale · up(down(x)).

    Applied after the whole block (both residual branches), on all tokens (CLS, registers, patches); the
    next block and the tap see the adapted x. No biases, no nonlinearity; ``down`` (D → r) starts at zero,
    so the adapted backbone equals the frozen one at the start of training, and ``up`` (r → D) gets
    ``nn.Linear``'s default init (kaiming-uniform, a = √5). ``scale = alpha / rank`` (their rank 7,
    alpha 0.01). In their code ``down`` is named ``lora_B`` and ``up`` ``lora_A``.

    Args:
        dim: the block's width D.
        rank: bottleneck width r.
        alpha: LoRA's alpha; the branch is multiplied by alpha / rank.
    """

    on_output = True  # DINOv2Tokens: x ← y + adapter(y) with y = block(x)

    def __init__(self, dim: int, rank: int = 7, alpha: float = 0.01) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)  # kaiming_uniform_(a=√5), nn.Linear's default
        nn.init.zeros_(self.down.weight)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) block output → (B, N, D) residual added to it."""
        return self.up(self.down(x)) * self.scale


ADAPTERS = {"parallel": LowRankAdapter, "lora": LoRAAdapter}


class UniversalEncoder(nn.Module):
    """Frozen DINOv2 + adapters + per-layer projections + per-voxel readout: images → voxel responses.

    Args:
        n_voxels: subject → voxel count V_s; global voxel ids number the subjects in sorted order.
        backbone: DINOv2 architecture name (see :data:`~brainit_pl.backbones.dinov2.ARCHS`), or a built
            :class:`~brainit_pl.backbones.dinov2.DINOv2Tokens` (then ``tiny``, ``weights``, ``layers`` and
            ``weights_dir`` are unused).
        tiny: use the tiny random DINOv2 twin (tests, CPU demos).
        weights: DINOv2 weight file; ``None`` = the weights folder (real) or seeded random (tiny).
        layers: tapped blocks, 1-based; ``None`` = the architecture's default.
        token_dim: width C of the projected tokens (128).
        embed_dim: voxel embedding width E (256).
        adapter_rank: rank of the per-block adapters (0 = no adapters).
        adapter_scale: output scale of the adapters; for ``lora`` it is LoRA's alpha, and the branch is
            multiplied by ``adapter_scale / adapter_rank`` (the authors' 0.01 / 7).
        adapter: ``"parallel"`` (:class:`LowRankAdapter`, beside each block, on its input) or ``"lora"``
            (:class:`LoRAAdapter`, the authors' LoRA on each block's output).
        dropout: dropout on each layer's pooled vector.
        voxel_chunk: largest number of voxels read out at once; the readout costs B·V·T floats per layer,
            so long voxel lists are read out chunk by chunk (same result, bounded memory).
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS``).
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        backbone: str | DINOv2Tokens = "dinov2_vitl14_reg",
        tiny: bool = False,
        weights: str | None = None,
        layers: Sequence[int] | None = None,
        token_dim: int = 128,
        embed_dim: int = 256,
        adapter_rank: int = 7,
        adapter_scale: float = 0.01,
        adapter: str = "parallel",
        dropout: float = 0.25,
        voxel_chunk: int | None = 4096,
        weights_dir: str | None = None,
    ) -> None:
        super().__init__()
        require(bool(n_voxels), "UniversalEncoder needs the voxel count of at least one subject (n_voxels)")
        require(voxel_chunk is None or voxel_chunk >= 1, f"voxel_chunk must be >= 1, got {voxel_chunk}")
        self.n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
        starts = torch.tensor([0, *self.n_voxels.values()]).cumsum(0).tolist()
        self.voxel_offsets = dict(zip(self.n_voxels, starts))
        self.total_voxels = starts[-1]
        self.voxel_chunk = voxel_chunk

        require(adapter in ADAPTERS, f"adapter must be one of {sorted(ADAPTERS)}, got {adapter!r}")
        self.backbone: DINOv2Tokens = (
            backbone
            if isinstance(backbone, DINOv2Tokens)
            else build_dinov2(backbone, weights, tiny=tiny, layers=layers, weights_dir=weights_dir)
        )
        width, n_layers = self.backbone.width, len(self.backbone.layers)
        # Adapters on every block up to the last tap: later blocks do not reach any tapped output.
        self.adapters = (
            nn.ModuleList(
                ADAPTERS[adapter](width, adapter_rank, adapter_scale) for _ in range(self.backbone.layers[-1])
            )
            if adapter_rank > 0
            else None
        )
        self.project = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, token_dim)) for _ in range(n_layers)
        )
        self.readout = VoxelReadout(
            self.total_voxels,
            n_layers=n_layers,
            n_tokens=self.backbone.n_tokens,
            token_dim=token_dim,
            embed_dim=embed_dim,
            dropout=dropout,
        )
        # The table under its public name, sharing the readout's Parameter (built on meta: no copy).
        self.voxel_embed = nn.Embedding(self.total_voxels, embed_dim, device="meta")
        self.voxel_embed.weight = self.readout.voxel_embed

    def tokens(self, images: Tensor) -> Tensor:
        """Adapted backbone tokens, normalised and projected.

        Args:
            images: (B, 3, H, W) in [0, 1] (resized to 224² by the backbone if needed).

        Returns:
            (B, L, T, C) tokens of the L tapped layers.
        """
        raw = self.backbone(images, adapters=self.adapters)  # (B, L, T, D)
        return torch.stack([proj(raw[:, i]) for i, proj in enumerate(self.project)], dim=1)  # (B, L, T, C)

    def read(self, tokens: Tensor, voxel_ids: Tensor) -> Tensor:
        """Read voxels out of projected tokens, ``voxel_chunk`` voxels at a time.

        Args:
            tokens: (B, L, T, C) from :meth:`tokens`.
            voxel_ids: (B, V) global voxel ids per sample, or (V,) shared by the batch.

        Returns:
            (B, V) predicted responses.
        """
        n = voxel_ids.shape[-1]
        chunk = self.voxel_chunk or n
        if n <= chunk:
            return self.readout(tokens, voxel_ids)
        return torch.cat([self.readout(tokens, ids) for ids in voxel_ids.split(chunk, dim=-1)], dim=-1)

    def forward(self, images: Tensor, voxel_ids: Tensor) -> Tensor:
        """Predicted responses of the chosen voxels.

        Args:
            images: (B, 3, 224, 224) in [0, 1].
            voxel_ids: (B, V) global voxel ids per sample (subjects may mix), or (V,) shared by the batch.

        Returns:
            (B, V) predicted (z-scored) betas.
        """
        return self.read(self.tokens(images), voxel_ids)

    def subject_voxel_ids(self, subject: int, device: torch.device | None = None) -> Tensor:
        """(V_s,) the global voxel ids of all voxels of ``subject``, in store order."""
        require(
            subject in self.n_voxels,
            f"subject {subject} is not in this encoder (it has {list(self.n_voxels)})",
        )
        start = self.voxel_offsets[subject]
        return torch.arange(start, start + self.n_voxels[subject], device=device)


SHIFT_PADDINGS = ("replicate", "reflect")


def random_shift(
    images: Tensor,
    max_shift: int = 3,
    generator: torch.Generator | None = None,
    padding: str = "reflect",
) -> Tensor:
    """Shift each image by its own random integer offset in [-max_shift, max_shift] on both axes.

    Done as padding by ``max_shift`` followed by a random crop back to the input size. ``padding``
    ``"replicate"`` repeats the edge pixels into the uncovered border, as the authors' code does
    (``scipy.ndimage.shift`` with order 0 and mode ``nearest``); ``"reflect"`` mirrors the content there
    (a departure, docs/method.md §2). Neither shows the backbone black bars.

    Args:
        images: (B, C, H, W).
        max_shift: largest shift in pixels.
        generator: random generator of the offsets (default: torch's global one).
        padding: ``"replicate"`` or ``"reflect"`` (a ``torch.nn.functional.pad`` mode).

    Returns:
        (B, C, H, W) shifted images.
    """
    require(padding in SHIFT_PADDINGS, f"padding must be one of {SHIFT_PADDINGS}, got {padding!r}")
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode=padding)  # (B, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    # A per-image slice: B small copies are cheaper and clearer than a gather over a sampling grid.
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def encoder_loss(pred: Tensor, target: Tensor, cos_weight: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """The encoder's loss: MSE − ``cos_weight`` · cosine, the cosine taken across each image's voxels.

    Args:
        pred: (B, V) predicted betas.
        target: (B, V) measured betas.
        cos_weight: weight of the cosine term (0.1).

    Returns:
        (loss, mse, cos): scalars; ``cos`` is the mean over images of cos(pred_b, target_b).
    """
    pred, target = pred.float(), target.float()
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    return mse - cos_weight * cos, mse, cos


# ------------------------------------------------------------------------------ the voxel table layout
def voxel_offsets(n_voxels: Mapping[int, int]) -> dict[int, int]:
    """Subject → its first row in the voxel table of ``n_voxels`` (subjects stacked in sorted order)."""
    offsets, start = {}, 0
    for subject in sorted(n_voxels):
        offsets[int(subject)], start = start, start + int(n_voxels[subject])
    return offsets


def check_trainable(trainable: str, voxel_subjects: Sequence[int] | None) -> None:
    """The ``trainable`` / ``voxel_subjects`` hparams of the modules that can train the voxel table alone."""
    require(trainable in ("all", "voxel_embed"), f"trainable must be all or voxel_embed, got {trainable!r}")
    require(
        voxel_subjects is None or trainable == "voxel_embed",
        "voxel_subjects restricts the voxel table's training: it needs trainable=voxel_embed",
    )


def extended_table(base: Mapping[Any, Any], new_voxels: Mapping[int, int], checkpoint: Any) -> dict[int, int]:
    """A base checkpoint's voxel table (subject → count) with the new subjects added, sorted by subject.

    Raises:
        BrainITError: a new subject already in the base table (transfer needs base models without it).
    """
    base = {int(s): int(v) for s, v in base.items()}
    taken = sorted(set(new_voxels) & set(base))
    require(
        not taken,
        f"subject(s) {taken} are already in the voxel table of {checkpoint} (subjects {sorted(base)}): "
        "transfer needs base models trained without the new subject",
    )
    return dict(sorted({**base, **{int(s): int(v) for s, v in new_voxels.items()}}.items()))


def _require_part(n_voxels: Mapping[int, int], table: Mapping[int, int]) -> None:
    require(
        all(table.get(s) == v for s, v in n_voxels.items()),
        f"the voxel table {dict(n_voxels)} (subject: voxels) is not part of the table {dict(table)}",
    )


def move_voxel_ids(ids: Tensor, n_voxels: Mapping[int, int], table: Mapping[int, int]) -> Tensor:
    """Global voxel ids of the table ``n_voxels`` → the same voxels' ids in ``table``, a table holding it.

    Args:
        ids: integer ids in [0, sum(n_voxels)), any shape.
        n_voxels: subject → count of the table the ids number.
        table: subject → count of the larger table (same counts for the common subjects).

    Returns:
        int64 ids of the same shape.
    """
    _require_part(n_voxels, table)
    ids = torch.as_tensor(ids, dtype=torch.long)
    require(
        bool(((ids >= 0) & (ids < sum(n_voxels.values()))).all()),
        f"voxel ids outside the table of {sum(n_voxels.values())} rows",
    )
    old, new = voxel_offsets(n_voxels), voxel_offsets(table)
    subjects = sorted(old)
    starts = torch.tensor([old[s] for s in subjects])  # (S,)
    shift = torch.tensor([new[s] - old[s] for s in subjects])  # (S,)
    which = torch.searchsorted(starts, ids, right=True) - 1  # index of each id's subject
    return ids + shift[which]


def grow_voxel_table(
    table: Tensor, n_voxels: Mapping[int, int], new_n_voxels: Mapping[int, int], fill: Tensor
) -> Tensor:
    """A table of ``new_n_voxels`` whose rows of the subjects of ``n_voxels`` are ``table``'s, copied.

    Args:
        table: (V, D) the rows of ``n_voxels``'s subjects, in its global order.
        n_voxels: subject → count of ``table``.
        new_n_voxels: a table holding every subject of ``n_voxels`` with the same count, and more.
        fill: (V_new, D) where the added subjects' rows come from (e.g. a freshly built module's init).

    Returns:
        (V_new, D) a new tensor in ``fill``'s dtype and device.
    """
    _require_part(n_voxels, new_n_voxels)
    total = sum(new_n_voxels.values())
    require(
        table.shape[0] == sum(n_voxels.values()) and fill.shape == (total, table.shape[1]),
        f"grow_voxel_table: a ({sum(n_voxels.values())}, D) table and a ({total}, D) fill expected, got "
        f"{tuple(table.shape)} and {tuple(fill.shape)}",
    )
    out = fill.detach().clone()
    old, new = voxel_offsets(n_voxels), voxel_offsets(new_n_voxels)
    for subject, count in n_voxels.items():
        out[new[subject] : new[subject] + count] = table[old[subject] : old[subject] + count]
    return out


class VoxelRows:
    """Train only the rows of some subjects of a voxel table (a new subject, docs/method.md §7).

    Two things move the other rows of the same Parameter: their gradient (zero when a batch holds none of
    their voxels, but nothing guarantees that) and AdamW's decoupled weight decay p ← p·(1 − lr·wd), which
    shrinks every row whatever its gradient. So the table's optimizer group gets ``weight_decay`` 0 and
    ``row_weight_decay`` wd (:meth:`param_group`), and right before each optimizer step :meth:`before_step`
    zeroes the gradient outside the rows and decays the rows alone: the rows get the very update AdamW would
    give them (decay, then the Adam step), while the other rows keep zero gradients and zero moments, so
    their Adam update is exactly 0 and they stay bit-identical. (A separate Parameter for the new rows would
    also work, but would change the checkpoint's keys and the BIT's forward.)

    Args:
        n_voxels: subject → count of the table.
        subjects: the subjects whose rows train.
    """

    def __init__(self, n_voxels: Mapping[int, int], subjects: Sequence[int]) -> None:
        unknown = sorted(set(subjects) - set(n_voxels))
        require(bool(subjects), "VoxelRows needs at least one subject")
        require(not unknown, f"voxel_subjects {unknown} are not in the voxel table {sorted(n_voxels)}")
        offsets = voxel_offsets(n_voxels)
        self.mask = torch.zeros(sum(n_voxels.values()), 1, dtype=torch.bool)  # (V, 1)
        for s in subjects:
            self.mask[offsets[s] : offsets[s] + n_voxels[s]] = True

    @staticmethod
    def param_group(table: nn.Parameter, weight_decay: float) -> dict[str, Any]:
        """The optimizer group of the table: AdamW's own decay off, the rows' decay kept for :meth:`before_step`."""
        return {"params": [table], "weight_decay": 0.0, "row_weight_decay": weight_decay}

    @torch.no_grad()
    def before_step(self, table: nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradient outside the rows; decay the rows by the group's lr · ``row_weight_decay``."""
        if self.mask.device != table.device:
            self.mask = self.mask.to(table.device)
        if table.grad is not None:
            table.grad.masked_fill_(~self.mask, 0.0)
        for group in optimizer.param_groups:
            decay = group.get("row_weight_decay", 0.0)
            if decay and any(p is table for p in group["params"]):
                # the other rows are multiplied by exactly 1.0: unchanged to the bit
                table.mul_(torch.where(self.mask, 1.0 - group["lr"] * decay, 1.0).to(table.dtype))
