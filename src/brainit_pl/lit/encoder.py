"""Training the Universal Brain Encoder (docs/method.md §2): the LightningModule and its voxel metrics.

Training: every sample is one image with k randomly drawn voxels of its subject (the DataModule's
``voxels_per_sample``; subjects mix within a batch, all subjects train jointly); each image is shifted by a
random ±3 px (pad + crop, :func:`~brainit_pl.models.encoder.random_shift`: edge pixels repeated with
``shift_padding: replicate``, the authors', or mirrored with ``reflect``); loss MSE − 0.1·cos.

Validation: for every voxel, the Pearson correlation r_v between predicted and measured (repeat-averaged)
betas over the split's images of its subject. ``val/voxel_corr_median`` and ``val/voxel_corr_p75`` are taken
over all voxels of all subjects (the p75 drives ReduceLROnPlateau). When the store holds the per-voxel
noise-ceiling SNR (``ncsnr``: real NSD, and the simulator's truth), also ``val/noise_ceiling_fraction`` =
median over voxels of r_v² / NC_v with NC_v = ncsnr² / (ncsnr² + mean_i 1/n_i) — the explainable fraction of
the variance of a response averaged over n_i repeats (NSD's noise-ceiling formula, with the mean over the
split's images of 1/n_i for images with unequal repeats); voxels with NC_v < 1e-3 are left out.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from brainit_pl.lit.checkpoints import read_checkpoint
from brainit_pl.models.encoder import (
    UniversalEncoder,
    VoxelRows,
    check_trainable,
    encoder_loss,
    extended_table,
    grow_voxel_table,
    random_shift,
)

log = logging.getLogger(__name__)

MIN_NOISE_CEILING = 1e-3  # NC below this: no signal to explain, r²/NC would only amplify noise


class VoxelCorrelation(Metric):
    """Per-voxel Pearson r between predictions and targets, accumulated over batches (and devices).

    Keeps per-voxel sums (x, y, x², y², xy, count, Σ 1/n_repeats) over the global voxel table, so batches
    may hold any subjects and voxels, and the states sum across DDP ranks.

    Args:
        n_voxels: size of the global voxel table.
    """

    full_state_update = False

    def __init__(self, n_voxels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_voxels = n_voxels
        for name in ("sx", "sy", "sxx", "syy", "sxy", "count", "inv_repeats"):
            self.add_state(name, torch.zeros(n_voxels, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, pred: Tensor, target: Tensor, voxel_ids: Tensor, n_repeats: Tensor | None = None
    ) -> None:
        """Add a batch.

        Args:
            pred: (B, V) predictions.
            target: (B, V) measured values.
            voxel_ids: (B, V) or (V,) global voxel ids (each voxel at most once per sample).
            n_repeats: (B,) trials averaged into each target (default 1).
        """
        x, y = pred.detach().double(), target.detach().double()
        ids = voxel_ids.expand_as(x).reshape(-1)
        inv = torch.ones(len(x), dtype=torch.float64, device=x.device)
        if n_repeats is not None:
            inv = 1.0 / n_repeats.to(x.device, torch.float64)
        for state, value in (
            (self.sx, x),
            (self.sy, y),
            (self.sxx, x * x),
            (self.syy, y * y),
            (self.sxy, x * y),
            (self.count, torch.ones_like(x)),
            (self.inv_repeats, inv[:, None].expand_as(x)),
        ):
            state.index_add_(0, ids, value.reshape(-1))

    def compute(self) -> Tensor:
        """(V_total,) float64 per-voxel r; NaN where a voxel was seen < 2 times, 0 where either side is constant."""
        n = self.count
        cov = self.sxy - self.sx * self.sy / n.clamp_min(1)
        var_x = (self.sxx - self.sx**2 / n.clamp_min(1)).clamp_min(0)
        var_y = (self.syy - self.sy**2 / n.clamp_min(1)).clamp_min(0)
        r = cov / (var_x * var_y).sqrt()
        r = torch.where((var_x > 0) & (var_y > 0), r, torch.zeros_like(r)).clamp(-1, 1)
        return torch.where(n >= 2, r, torch.full_like(r, float("nan")))

    def noise_ceiling(self, ncsnr: Tensor) -> Tensor:
        """(V_total,) NC_v = ncsnr² / (ncsnr² + mean 1/n_repeats), the largest r² a perfect model reaches."""
        snr2 = ncsnr.to(self.count.device, torch.float64) ** 2
        return snr2 / (snr2 + self.inv_repeats / self.count.clamp_min(1))


def summarize(r: Tensor, noise_ceiling: Tensor | None = None) -> dict[str, float]:
    """Median and 75th percentile of the voxels' r (and the median r²/NC); NaN voxels are skipped."""
    seen = ~torch.isnan(r)
    out = {"voxel_corr_median": float("nan"), "voxel_corr_p75": float("nan")}
    if seen.any():
        out["voxel_corr_median"] = float(torch.quantile(r[seen], 0.5))
        out["voxel_corr_p75"] = float(torch.quantile(r[seen], 0.75))
    if noise_ceiling is not None:
        ok = seen & (noise_ceiling >= MIN_NOISE_CEILING)
        frac = r[ok] ** 2 / noise_ceiling[ok]
        out["noise_ceiling_fraction"] = float(frac.median()) if ok.any() else float("nan")
    return out


class EncoderModule(L.LightningModule):
    """The Universal Brain Encoder, trained on all subjects jointly.

    Args:
        n_voxels: subject → voxel count (linked from the DataModule; sets the voxel table size).
        backbone: DINOv2 architecture name.
        tiny: use the tiny random DINOv2 twin.
        weights: DINOv2 weight file (``None``: the weights folder, or random for the twin).
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS``).
        layers: tapped DINOv2 blocks, 1-based (``None``: [1, 6, 12, 18, 24], or all 5 of the twin).
        token_dim: projected token width C.
        embed_dim: voxel embedding width E.
        adapter_rank: rank of the per-block adapters (0: none).
        adapter_scale: output scale of the adapters (for ``lora``: its alpha, the branch is scaled by
            ``adapter_scale / adapter_rank``).
        adapter: ``"parallel"`` (a GELU bottleneck beside each block) or ``"lora"`` (the authors' LoRA on
            each block's output; :class:`~brainit_pl.models.encoder.LoRAAdapter`).
        dropout: dropout of the readout.
        voxel_chunk: voxels read out at once (bounds val/predict memory).
        lr: Adam learning rate.
        cos_weight: weight of the cosine term of the loss.
        max_shift: largest random image shift in pixels during training (0: none).
        shift_padding: what fills the border a shift uncovers: ``"replicate"`` (the edge pixels, the
            authors') or ``"reflect"`` (mirrored content; a departure, kept as an option).
        lr_factor: ReduceLROnPlateau factor (the authors': 0.1).
        lr_patience: ReduceLROnPlateau patience in epochs (the authors': 4).
        lr_threshold: ReduceLROnPlateau threshold (the authors': 0.003).
        lr_threshold_mode: ``"rel"`` or ``"abs"`` (the authors': ``"abs"``, a gain of 0.003 in the p75 r).
        trainable: ``"all"`` (adapters, projections, readout) or ``"voxel_embed"`` (only the voxel table;
            transfer to a new subject, docs/method.md §7: everything else has ``requires_grad=False`` and stays
            out of the optimizer).
        voxel_subjects: with ``"voxel_embed"``, only these subjects' rows of the table train (the others
            keep zero gradients, :class:`~brainit_pl.models.encoder.VoxelRows`); ``None``: every row.
        brain_maps: after the last validation epoch and at test, draw each subject's per-voxel r (and noise
            ceiling, when the store has ncsnr) on its brain — volume or fsaverage surface — as
            ``<log dir>/brain_maps/<stage>_<map>_subjNN.png`` and TensorBoard images ``<stage>/brain_<map>/subjNN``.
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        backbone: str = "dinov2_vitl14_reg",
        tiny: bool = False,
        weights: str | None = None,
        weights_dir: str | None = None,
        layers: list[int] | None = None,
        token_dim: int = 128,
        embed_dim: int = 256,
        adapter_rank: int = 7,
        adapter_scale: float = 0.01,
        adapter: Literal["parallel", "lora"] = "parallel",
        dropout: float = 0.25,
        voxel_chunk: int | None = 4096,
        lr: float = 1e-3,
        cos_weight: float = 0.1,
        max_shift: int = 3,
        shift_padding: Literal["replicate", "reflect"] = "reflect",
        lr_factor: float = 0.5,
        lr_patience: int = 2,
        lr_threshold: float = 1e-4,
        lr_threshold_mode: Literal["rel", "abs"] = "rel",
        trainable: Literal["all", "voxel_embed"] = "all",
        voxel_subjects: list[int] | None = None,
        brain_maps: bool = False,
    ) -> None:
        super().__init__()
        check_trainable(trainable, voxel_subjects)
        self.save_hyperparameters()
        self.encoder = UniversalEncoder(
            n_voxels,
            backbone=backbone,
            tiny=tiny,
            weights=weights,
            layers=layers,
            token_dim=token_dim,
            embed_dim=embed_dim,
            adapter_rank=adapter_rank,
            adapter_scale=adapter_scale,
            adapter=adapter,
            dropout=dropout,
            voxel_chunk=voxel_chunk,
            weights_dir=weights_dir,
        )
        self.voxel_rows = None
        if trainable == "voxel_embed":
            self.encoder.requires_grad_(False)
            self.encoder.voxel_embed.weight.requires_grad_(True)
            if voxel_subjects is not None:
                self.voxel_rows = VoxelRows(self.encoder.n_voxels, voxel_subjects)
        total = self.encoder.total_voxels
        self.metrics = torch.nn.ModuleDict({s: VoxelCorrelation(total) for s in ("val", "test")})
        self.ncsnr: Tensor | None = None  # (V_total,) from the store, when it has one for every subject

    def forward(self, images: Tensor, voxel_ids: Tensor) -> Tensor:
        """(B, 3, 224, 224) images in [0, 1], (B, V) or (V,) global voxel ids → (B, V) predicted betas."""
        return self.encoder(images, voxel_ids)

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, stage: str) -> None:
        """Read the per-voxel ncsnr of every subject from the DataModule's store, when all have one."""
        store = getattr(getattr(self.trainer, "datamodule", None), "store", None) if self._trainer else None
        if store is None:
            return
        parts = [store.subject(s).ncsnr for s in self.encoder.n_voxels]
        if all(p is not None for p in parts):
            self.ncsnr = torch.from_numpy(np.concatenate(parts).astype(np.float64))
        else:
            log.info("the store has no ncsnr for every subject: no noise-ceiling fraction is logged")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = random_shift(batch["image_224"], self.hparams.max_shift, padding=self.hparams.shift_padding)
        pred = self(images, batch["voxel_ids"])  # (B, k)
        loss, mse, cos = encoder_loss(pred, batch["betas"], self.hparams.cos_weight)
        bs = len(pred)
        self.log("train/loss", loss, batch_size=bs, prog_bar=True)
        self.log_dict({"train/mse": mse, "train/cos": cos}, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        # Eval batches are per-subject buckets with all voxels: the ids are the same row for every sample.
        pred = self(batch["image_224"], batch["voxel_ids"][0])  # (B, V_s), chunked over voxels
        loss, _, _ = encoder_loss(pred, batch["betas"], self.hparams.cos_weight)
        self.log(f"{stage}/loss", loss, batch_size=len(pred), sync_dist=True)
        self.metrics[stage].update(pred, batch["betas"], batch["voxel_ids"][0], batch["n_repeats"])
        return pred

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        metric = self.metrics[stage]
        r = metric.compute()  # syncs the sums across ranks: every rank logs the same numbers
        nc = metric.noise_ceiling(self.ncsnr) if self.ncsnr is not None else None
        summary = summarize(r.cpu(), None if nc is None else nc.cpu())
        self.log_dict({f"{stage}/{k}": v for k, v in summary.items()}, prog_bar=stage == "val")
        metric.reset()
        if self.hparams.get("brain_maps") and self._draws_maps(stage):
            self._brain_maps(stage, r.cpu(), None if nc is None else nc.cpu())

    def _draws_maps(self, stage: str) -> bool:
        """Brain maps on rank 0, at test and after the last validation epoch (nilearn takes seconds a map)."""
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.sanity_checking:
            return False
        last = trainer.max_epochs is not None and self.current_epoch + 1 >= trainer.max_epochs
        return stage == "test" or last or trainer.should_stop

    def _brain_maps(self, stage: str, r: Tensor, nc: Tensor | None) -> None:
        """Each subject's per-voxel r (and noise ceiling) on its brain: PNGs in the log dir and TensorBoard."""
        from brainit_pl.viz import log_png, plot_subject_map

        store = getattr(self.trainer.datamodule, "store", None)
        if store is None:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "brain_maps"
        maps = {
            "voxel_corr": (r, "encoder r"),
            **({"noise_ceiling": (nc, "noise ceiling")} if nc is not None else {}),
        }
        offsets = np.cumsum([0, *self.encoder.n_voxels.values()])
        for (subject, start), stop in zip(zip(self.encoder.n_voxels, offsets), offsets[1:]):
            if subject not in store.subjects:
                continue
            for name, (values, what) in maps.items():
                path = folder / f"{stage}_{name}_subj{subject:02d}.png"
                part = np.nan_to_num(values[start:stop].numpy())
                title = f"subj{subject:02d} {what} ({stage}, epoch {self.current_epoch})"
                if plot_subject_map(path, part, store.subject(subject), title=title):
                    log_png(self.logger, f"{stage}/brain_{name}/subj{subject:02d}", path, self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Predicted betas of all voxels of the batch's subject: ``betas`` (B, V_s), ``nsd_id``, ``subject``."""
        return {
            "nsd_id": batch["nsd_id"],
            "subject": batch["subject"],
            "betas": self(batch["image_224"], batch["voxel_ids"][0]),
        }

    @torch.no_grad()
    def predict_voxels(self, images: Tensor, subject: int) -> Tensor:
        """Synthetic fMRI: every voxel of ``subject`` for a batch of images, in eval mode.

        Args:
            images: (B, 3, 224, 224) in [0, 1].
            subject: a subject of ``n_voxels``.

        Returns:
            (B, V_s) predicted betas in the store's voxel order, computed ``voxel_chunk`` voxels at a time.
        """
        was_training = self.training
        self.eval()
        try:
            ids = self.encoder.subject_voxel_ids(subject, device=images.device)
            return self.encoder.read(self.encoder.tokens(images), ids)
        finally:
            self.train(was_training)

    def configure_optimizers(self) -> dict[str, Any]:
        # Only the adapters, projections and readout are parameters: the frozen DINOv2 is not registered.
        # Frozen parameters (trainable="voxel_embed") stay out of the optimizer altogether.
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.hparams.lr, amsgrad=True)
        hp = self.hparams
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=hp.lr_factor,
            patience=hp.lr_patience,
            threshold=hp.lr_threshold,
            threshold_mode=hp.lr_threshold_mode,
        )
        # strict=False: a run without a val split (val_fraction 0) trains at a constant learning rate.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/voxel_corr_p75", "strict": False},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``voxel_subjects``: the other subjects' rows get a zero gradient (Adam moves them by 0)."""
        if self.voxel_rows is not None:
            self.voxel_rows.before_step(self.encoder.voxel_embed.weight, optimizer)

    # ------------------------------------------------------------------------------------- transfer
    @classmethod
    def transfer_from(
        cls, checkpoint: str | os.PathLike, new_voxels: dict[int, int], **overrides: Any
    ) -> EncoderModule:
        """A module for new subjects: the base checkpoint's encoder with their rows added to the voxel table.

        Every weight is the checkpoint's (the base subjects' rows moved to their place in the larger
        table); the new rows keep this class's random init; only they train (``trainable="voxel_embed"``,
        ``voxel_subjects`` = the new subjects). The module saves and loads like any EncoderModule.

        Args:
            checkpoint: an EncoderModule checkpoint of the base subjects.
            new_voxels: subject → voxel count of the subjects to add (none of them in the checkpoint).
            **overrides: other hyperparameters (e.g. ``lr``).

        Raises:
            BrainITError: an unreadable checkpoint, or a subject already in its voxel table.
        """
        ckpt = read_checkpoint(checkpoint, "EncoderModule")
        hparams = ckpt["hyper_parameters"]
        base = {int(s): int(v) for s, v in hparams["n_voxels"].items()}
        table = extended_table(base, new_voxels, checkpoint)
        names = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in hparams.items() if k in names}
        kwargs.update(n_voxels=table, trainable="voxel_embed", voxel_subjects=sorted(new_voxels), **overrides)
        module = cls(**kwargs)
        state = dict(ckpt["state_dict"])
        fill = module.encoder.voxel_embed.weight
        for key in ("encoder.voxel_embed.weight", "encoder.readout.voxel_embed"):  # one Parameter, two names
            state[key] = grow_voxel_table(state[key], base, table, fill)
        module.load_state_dict(state, strict=True)
        return module
