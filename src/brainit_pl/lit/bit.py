"""Stage-1 training of the two BITs (docs/method.md §4–§5): fMRI → CLIP tokens (semantic) or VGG tokens (low-level).

One LightningModule for both branches and for the MindEye2-style baseline that predicts the same targets:

* ``branch="semantic"``: MSE on the 256 CLIP tokens cached by ``brainit-pl extract-features`` (batch key
  ``clip_tokens``; the DataModule needs ``features: [clip]``);
* ``branch="lowlevel"``: symmetric InfoNCE per VGG scale on [512, 512, 128, 64, 16] token positions drawn per
  image (only those queries are decoded); the targets are computed on the fly from ``image_112`` by the frozen
  VGG16-BN (:class:`~brainit_pl.backbones.vgg.VGGTokens`), which never lands in a checkpoint. Negatives are
  the other sampled tokens of the same scale in the *local* batch (no gather across DDP ranks, as in the
  authors' code, so the loss value depends on the per-device batch size);
* ``decoder="bit"`` (the :class:`~brainit_pl.models.bit.BIT`, with the V2C clusters of ``clusters``) or
  ``"mindeye2"`` (:class:`~brainit_pl.models.baselines.MindEye2Decoder`, no clusters).

Optimisation: AdamW (wd 0.01), lr 5e-4, cubic warm-up then ReduceLROnPlateau on the validation loss
(:class:`~brainit_pl.lit.schedule.CubicWarmupPlateau`). The module steps that scheduler itself, once per
epoch right after the epoch-end validation: Lightning would step it only after ``ModelCheckpoint`` has
saved the epoch, so a run resumed from that checkpoint would replay the previous epoch's rate. Logged: ``train/loss``, ``val/loss`` and, every
``quality_every_n_epochs`` epochs, the feature-prediction quality of :mod:`brainit_pl.metrics.features`
(``val/clip_cos`` and ``val/clip_2way``, or ``val/vgg_2way``); the learning rate through ``LearningRateMonitor`` in the configs.

Reproducibility: the low-level token positions are drawn from a generator keyed by (seed, global step,
rank), like the DataModule's voxel draws, so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from brainit_pl.errors import BrainITError, require
from brainit_pl.lit.checkpoints import architecture_differences, checkpoint_dict, file_digest
from brainit_pl.lit.guards import check_finite_loss
from brainit_pl.lit.schedule import CubicWarmupPlateau
from brainit_pl.lit.test_scores import TestScoresMixin
from brainit_pl.metrics.features import eval_positions, feature_quality
from brainit_pl.models.bit import BIT, BITConfig
from brainit_pl.models.encoder import VoxelRows, check_trainable
from brainit_pl.models.losses import infonce_per_scale, semantic_mse

log = logging.getLogger(__name__)

SEMANTIC_SHAPE = (256, 1664)  # OpenCLIP ViT-bigG/14 patch tokens
LOWLEVEL_TOKENS_PER_SCALE = (512, 512, 128, 64, 16)
# hparams a checkpoint must share with the module that loads it (the rest may change, e.g. lr or epochs)
ARCHITECTURE_HPARAMS = (
    "branch",
    "decoder",
    "n_voxels",
    "dim",
    "n_heads",
    "n_self",
    "mlp_ratio",
    "target_shape",
    "mindeye2",
)


class BITModule(TestScoresMixin, L.LightningModule):
    """A feature decoder (BIT or the MindEye2-style baseline) for one branch, trained on all subjects.

    Args:
        n_voxels: subject → voxel count (linked from the DataModule; sets the voxel table).
        branch: ``"semantic"`` (CLIP tokens) or ``"lowlevel"`` (VGG tokens).
        decoder: ``"bit"`` or ``"mindeye2"``.
        clusters: the V2C ``clusters.npz`` (``brainit-pl cluster``); required for the BIT.
        n_clusters: K expected in ``clusters`` (``None``: whatever the file has); a mismatch is an error.
        dim, n_heads, n_self, mlp_ratio: BIT sizes (:class:`~brainit_pl.models.bit.BITConfig`).
        target_shape: (tokens, width) of the semantic targets (``None``: 256 × 1664, ViT-bigG/14); checked
            against the DataModule's CLIP cache. The low-level shape comes from the VGG (7,190 × 512).
        gradient_checkpointing: recompute the BIT's blocks in the backward pass (less memory, ~30% slower).
        mindeye2: options of ``MindEye2Decoder`` (``latent``, ``n_blocks``, ...), for ``decoder="mindeye2"``.
        tokens_per_scale: low-level token positions drawn per image and scale.
        positions: ``"per_image"``: every image draws its own positions; ``"shared"``: one draw per batch, the
            same positions for every image, so each token's in-batch negatives include the same position of
            every other image (the paper leaves this open; see docs/bit.md for why it matters).
        vgg_weights: VGG16-BN weight file (``None``: the weights folder, or random for the tiny twin).
        tiny_vgg: use the tiny VGG twin (the real architecture with seeded random weights).
        vgg_slim: channel divisor of the tiny VGG twin (the demo uses 8: tokens 512/8 wide, ~64× cheaper).
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS``).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of cubic warm-up.
        warmup_start: the warm-up's starting fraction of ``lr``.
        lr_factor: ReduceLROnPlateau factor.
        lr_patience: ReduceLROnPlateau patience (epochs).
        lr_threshold: ReduceLROnPlateau threshold (the authors': 1e-3).
        lr_threshold_mode: ``"rel"`` or ``"abs"`` (the authors': ``"abs"``, a drop of 1e-3 in ``val/loss``;
            ``"rel"`` with 1e-4 is PyTorch's default, kept as an option).
        quality_every_n_epochs: compute ``val/clip_cos`` or ``val/vgg_2way`` every N epochs (always at test).
        seed: seed of the low-level position draws.
        trainable: ``"all"`` or ``"voxel_embed"``: only the BIT's voxel table trains (transfer to a new
            subject, docs/method.md §7); everything else has ``requires_grad=False`` and stays out of the optimizer.
        voxel_subjects: with ``"voxel_embed"``, only these subjects' rows train; the others keep zero
            gradients and no weight decay (:class:`~brainit_pl.models.encoder.VoxelRows`). ``None``: all rows.
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        branch: Literal["semantic", "lowlevel"] = "semantic",
        decoder: Literal["bit", "mindeye2"] = "bit",
        clusters: str | None = None,
        n_clusters: int | None = None,
        dim: int = 512,
        n_heads: int = 8,
        n_self: int = 5,
        mlp_ratio: float = 4.0,
        target_shape: tuple[int, int] | None = None,
        gradient_checkpointing: bool = False,
        mindeye2: dict[str, Any] | None = None,
        tokens_per_scale: list[int] = list(LOWLEVEL_TOKENS_PER_SCALE),  # noqa: B006 - copied, never mutated
        positions: Literal["per_image", "shared"] = "per_image",
        vgg_weights: str | None = None,
        tiny_vgg: bool = False,
        vgg_slim: int = 1,
        weights_dir: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_epochs: int = 15,
        warmup_start: float = 1e-3,
        lr_factor: float = 0.1,
        lr_patience: int = 5,
        lr_threshold: float = 1e-4,
        lr_threshold_mode: Literal["rel", "abs"] = "rel",
        quality_every_n_epochs: int = 1,
        seed: int = 0,
        trainable: Literal["all", "voxel_embed"] = "all",
        voxel_subjects: list[int] | None = None,
    ) -> None:
        super().__init__()
        require(branch in ("semantic", "lowlevel"), f"branch must be semantic or lowlevel, got {branch!r}")
        require(decoder in ("bit", "mindeye2"), f"decoder must be bit or mindeye2, got {decoder!r}")
        require(quality_every_n_epochs >= 1, "quality_every_n_epochs must be >= 1")
        require(
            positions in ("per_image", "shared"), f"positions must be per_image or shared, got {positions!r}"
        )
        check_trainable(trainable, voxel_subjects)
        require(
            trainable == "all" or decoder == "bit",
            "trainable=voxel_embed trains the BIT's voxel table: it needs decoder=bit",
        )
        self.save_hyperparameters()
        self.n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
        self.vgg_tokens = None
        if branch == "lowlevel":
            from brainit_pl.backbones.vgg import VGGTokens, build_vgg

            self.vgg_tokens = VGGTokens(
                build_vgg(vgg_weights, tiny=tiny_vgg, slim=vgg_slim, weights_dir=weights_dir)
            )
            layout = self.vgg_tokens.layout
            shape = (layout.total, layout.width)
            require(
                target_shape is None or tuple(target_shape) == shape,
                f"the low-level targets are the VGG's {shape} tokens, not target_shape={target_shape}",
            )
            require(
                len(tokens_per_scale) == len(layout.counts)
                and all(1 <= n <= c for n, c in zip(tokens_per_scale, layout.counts)),
                f"tokens_per_scale {tokens_per_scale} must give 1..{list(layout.counts)} positions per scale",
            )
            self.register_buffer("eval_positions", eval_positions(layout.counts), persistent=False)
        else:
            shape = tuple(target_shape or SEMANTIC_SHAPE)
        self.target_shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.clusters_sha1: str | None = None
        self.net = self._build_decoder()
        self.quality = torch.nn.ModuleDict(
            {stage: feature_quality(branch, f"{stage}/", self.target_shape[0]) for stage in ("val", "test")}
        )
        self.val_loss = MeanMetric()  # the scheduler's input (synced over ranks: one rate everywhere)
        self.init_test_scores()
        self.voxel_rows = None
        if trainable == "voxel_embed":
            self.net.requires_grad_(False)
            self.net.voxel_embed.requires_grad_(True)
            if voxel_subjects is not None:
                self.voxel_rows = VoxelRows(self.n_voxels, voxel_subjects)

    def _build_decoder(self) -> torch.nn.Module:
        hp = self.hparams
        n_out, out_dim = self.target_shape
        if hp.decoder == "mindeye2":
            from brainit_pl.models.baselines import MindEye2Decoder

            return MindEye2Decoder(self.n_voxels, n_out=n_out, out_dim=out_dim, **(hp.mindeye2 or {}))
        require(
            hp.clusters is not None,
            "the BIT needs its V2C clusters: set model.init_args.clusters to a clusters.npz from "
            "`brainit-pl cluster`",
        )
        from brainit_pl.models.v2c import load_clusters

        clusters = load_clusters(hp.clusters, self.n_voxels)  # a voxel-count mismatch fails here, clearly
        require(
            hp.n_clusters is None or hp.n_clusters == clusters.n_clusters,
            f"{hp.clusters} has K={clusters.n_clusters} clusters but the config says n_clusters={hp.n_clusters}",
        )
        self.clusters_sha1 = file_digest(hp.clusters)
        config = BITConfig(
            dim=hp.dim,
            n_clusters=clusters.n_clusters,
            n_heads=hp.n_heads,
            mlp_ratio=hp.mlp_ratio,
            n_self=hp.n_self,
            n_out=n_out,
            out_dim=out_dim,
        )
        net = BIT(config, clusters.cluster_of_voxel)
        net.gradient_checkpointing = hp.gradient_checkpointing
        return net

    def forward(self, betas: Tensor, voxel_ids: Tensor, query_ids: Tensor | None = None) -> Tensor:
        """(B, V) activations at (B, V) global voxel ids → (B, N_out | Q, width) predicted tokens."""
        return self.net(betas, voxel_ids, query_ids)

    # ------------------------------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        """Check that the DataModule delivers this branch's targets, with the right shape."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if dm is None:
            return
        if self.hparams.branch == "semantic":
            shapes = getattr(dm, "feature_shapes", {})
            require(
                "clip" in shapes,
                "the semantic BIT trains on cached CLIP tokens: set data.features: [clip] (and run "
                "`brainit-pl extract-features --store STORE`)",
            )
            require(
                tuple(shapes["clip"]) == self.target_shape,
                f"the CLIP cache holds {tuple(shapes['clip'])} tokens per image but the model predicts "
                f"{self.target_shape}; set model.init_args.target_shape: {list(shapes['clip'])}",
            )
        else:
            require(
                112 in getattr(dm, "image_sizes", ()),
                "the low-level BIT computes VGG targets from the 112² images: add 112 to data.image_sizes",
            )

    def _positions(self, batch_size: int, key: int) -> tuple[Tensor, list[int]]:
        """(B, Q) token positions drawn per image, scale by scale, from a generator seeded by ``key``."""
        layout = self.vgg_tokens.layout
        gen = torch.Generator().manual_seed(key)
        rows = 1 if self.hparams.get("positions", "per_image") == "shared" else batch_size
        picks = [
            offset + torch.rand(rows, count, generator=gen).argsort(dim=1)[:, :n].expand(batch_size, -1)
            for offset, count, n in zip(layout.offsets, layout.counts, self.hparams.tokens_per_scale)
        ]  # each (B, n): n distinct positions per image; with "shared", the same n for every image
        return torch.cat(picks, dim=1).to(self.device), list(self.hparams.tokens_per_scale)

    @torch.no_grad()
    def _vgg_targets(self, images: Tensor) -> Tensor:
        """(B, 3, 112, 112) → (B, 7190, 512) VGG tokens, in float32."""
        return self.vgg_tokens(images).float()

    def _loss(self, batch: dict[str, Tensor], key: int) -> tuple[Tensor, Tensor, Tensor]:
        """The branch's loss, and the predictions and targets it compared."""
        if self.hparams.branch == "semantic":
            pred = self(batch["betas"], batch["voxel_ids"]).float()  # (B, 256, D)
            target = batch["clip_tokens"]
            return semantic_mse(pred, target), pred, target
        query_ids, sizes = self._positions(len(batch["betas"]), key)  # (B, Q)
        pred = self(batch["betas"], batch["voxel_ids"], query_ids).float()  # (B, Q, 512)
        tokens = self._vgg_targets(batch["image_112"])  # (B, 7190, 512)
        target = torch.gather(tokens, 1, query_ids[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, Q, 512)
        return infonce_per_scale(pred, target, sizes), pred, target

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        key = (self.hparams.seed * 1_000_003 + self.global_step) * 4099 + self.global_rank
        loss, _, _ = self._loss(batch, key)
        check_finite_loss(
            self,
            loss,
            batch,
            batch_idx,
            "training loss",
            "lower model.init_args.lr, use 32-true precision, or check the data for NaN betas",
        )
        self.log("train/loss", loss, batch_size=len(batch["betas"]), prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> None:
        bs = len(batch["betas"])
        loss, pred, target = self._loss(batch, key=batch_idx)  # fixed positions: comparable across epochs
        self.log(f"{stage}/loss", loss, batch_size=bs, sync_dist=True, prog_bar=stage == "val")
        if stage == "val":
            self.val_loss.update(loss.detach(), weight=bs)
        if not self._quality_due(stage):
            return
        if stage == "test":
            self.record_test_keys(batch)
        if self.hparams.branch == "semantic":
            self.quality[stage].update(pred, target)
            return
        positions = self.eval_positions.expand(bs, -1)  # (B, P): only these queries are decoded
        pred = self(batch["betas"], batch["voxel_ids"], positions)  # (B, P, 512)
        target = self._vgg_targets(batch["image_112"])[:, self.eval_positions]  # (B, P, 512)
        self.quality[stage].update(pred, target)

    def _quality_due(self, stage: str) -> bool:
        return stage == "test" or (self.current_epoch + 1) % self.hparams.quality_every_n_epochs == 0

    def _log_quality(self, stage: str) -> None:
        if not self._quality_due(stage) or self.trainer.sanity_checking:
            self.quality[stage].reset()
            return
        self.log_dict(self.quality[stage].compute(), prog_bar=stage == "val")
        self.quality[stage].reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_quality("val")
        value = self.val_loss.compute() if self.val_loss.update_count else None
        self.val_loss.reset()
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if fitting and self.trainer.is_last_batch and value is not None:  # the epoch-end validation
            self.lr_schedulers().step(float(value))
            self._stepped_epoch = self.current_epoch

    def on_train_epoch_end(self) -> None:
        # An epoch without validation (no val split, or check_val_every_n_epoch > 1): the warm-up still
        # advances and the plateau count waits for the next validation.
        if getattr(self, "_stepped_epoch", None) != self.current_epoch:
            self.lr_schedulers().step(None)

    def on_test_epoch_end(self) -> None:
        self.write_test_scores(self.quality["test"])  # before _log_quality resets the collection
        self._log_quality("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """All predicted tokens of a batch: ``tokens`` (B, N_out, width), ``nsd_id``, ``subject``."""
        return {
            "tokens": self(batch["betas"], batch["voxel_ids"]),
            "nsd_id": batch["nsd_id"],
            "subject": batch["subject"],
        }

    # -------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.trainable == "all":
            params: Any = self.parameters()
        elif self.voxel_rows is None:
            params = [self.net.voxel_embed]  # frozen parameters stay out of the optimizer altogether
        else:  # AdamW's decay would shrink the other subjects' rows too: VoxelRows decays the rows alone
            params = [VoxelRows.param_group(self.net.voxel_embed, hp.weight_decay)]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = CubicWarmupPlateau(
            optimizer,
            warmup_epochs=hp.warmup_epochs,
            start_factor=hp.warmup_start,
            mode="min",
            factor=hp.lr_factor,
            patience=hp.lr_patience,
            threshold=hp.lr_threshold,
            threshold_mode=hp.lr_threshold_mode,
        )
        # Lightning saves and restores the scheduler; it is stepped in on_validation_epoch_end (see the
        # module docstring), so Lightning's own step is a no-op (lr_scheduler_step).
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "strict": False},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Lightning's epoch-end step: nothing to do, the scheduler was stepped after validation."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``voxel_subjects``: zero the other rows' gradient, decay the trained rows (VoxelRows)."""
        if self.voxel_rows is not None:
            self.voxel_rows.before_step(self.net.voxel_embed, optimizer)

    # ------------------------------------------------------------------------------------- transfer
    @classmethod
    def transfer_from(
        cls,
        checkpoint: str | os.PathLike,
        new_voxels: dict[int, int],
        clusters: str | os.PathLike,
        neighbours: tuple[Tensor, Tensor] | None = None,
        **overrides: Any,
    ) -> BITModule:
        """A BIT for new subjects: the base checkpoint's BIT with their rows added to the voxel table.

        The shared weights and the base subjects' rows (moved to their place in the larger table) are the
        checkpoint's; the new rows are copied from their nearest reference voxels (``neighbours``,
        :meth:`~brainit_pl.models.bit.BIT.init_voxels_from`) or keep the random init; only the new rows
        train (``trainable="voxel_embed"``, ``voxel_subjects`` = the new subjects). The module saves and
        loads like any BITModule; its ``clusters`` file must cover the larger table.

        Args:
            checkpoint: a BITModule checkpoint (``decoder="bit"``) of the base subjects.
            new_voxels: subject → voxel count of the subjects to add.
            clusters: the V2C clusters of the larger table (base labels + the new voxels' nearest-neighbour
                labels).
            neighbours: (target_ids, source_ids), both (M,) global ids of the *larger* table: row target
                starts as a copy of row source. ``None``: random init.
            **overrides: other hyperparameters (``lr``, ``warmup_epochs``, ...).

        Raises:
            BrainITError: an unreadable checkpoint, a MindEye2-style decoder, a subject already in its table.
        """
        from brainit_pl.lit.new_subjects import bit_for_new_subjects

        return bit_for_new_subjects(cls, checkpoint, new_voxels, clusters, neighbours, **overrides)

    def checkpoint_dict(self) -> dict[str, Any]:
        """This module as a Lightning checkpoint without a Trainer (:func:`~brainit_pl.lit.checkpoints.checkpoint_dict`).

        ``torch.save`` it and :meth:`load_from_checkpoint` reads it like a ``fit`` checkpoint, e.g. a BIT
        whose weights were changed outside its own training (stage 2's adapted BIT, for reconstruction).
        """
        return checkpoint_dict(self)

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["brainit_bit"] = {"clusters_sha1": self.clusters_sha1}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with the differences named, a checkpoint of another architecture or other clusters."""
        diffs = architecture_differences(
            checkpoint.get("hyper_parameters", {}), self.hparams, ARCHITECTURE_HPARAMS
        )
        theirs = checkpoint.get("brainit_bit", {}).get("clusters_sha1")
        if theirs != self.clusters_sha1:
            diffs.append(f"clusters file sha1: checkpoint {theirs} vs config {self.clusters_sha1}")
        if diffs:
            raise BrainITError("the checkpoint was trained with another configuration: " + "; ".join(diffs))
