"""Reconstructions while a model trains and when it is tested (docs/method.md §6), in TensorBoard and on disk.

Attach to a run (``trainer.callbacks`` in the config). What the chain is made of depends on the module:

* :class:`~brainit_pl.lit.brainit.BrainITModule` (``brainit-pl test --config configs/test_*.yaml``): its
  trained models, the method's whole chain (low-level → DIP → stage 2 → refined);
* a ``Stage2Module`` being trained: stage ``semantic`` (the method), after the DIP of the low-level BIT
  checkpoint ``other`` if given;
* a ``BITModule`` being trained: its own branch; a low-level BIT pairs with ``stage2`` (a stage-2
  checkpoint: stage ``semantic``) or ``other`` (a stage-1 semantic BIT: the ablation stage
  ``semantic_stock``); a semantic BIT can only preview with the stock UNet (``semantic_stock``).


* validation, every ``every_n_epochs`` epochs: a fixed subset (the first ``n_images`` validation images)
  is reconstructed with ``dip_steps`` DIP steps; ``val/recon_<stage>_pixcorr`` / ``_ssim`` are logged and a
  grid (ground truth | each stage) goes to TensorBoard as ``val/reconstructions``;
* test (unless ``test=False``: the training configs only preview): every test image (``test_dip_steps``), saved as ``brainit-pl reconstruct`` saves them (PNGs and
  arrays per subject and stage, in ``<log dir>/reconstruct``), scored per stage with the metric suite
  (``metrics_<stage>/``) and logged to TensorBoard (``test_<stage>/...``).

Rank 0 does the validation reconstructions (the others skip them). At test every rank reconstructs its own
shard of the test images (the DataModule shards them), all write into one folder, and rank 0 scores the
whole folder once every rank is done.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from brainit_pl.errors import require
from brainit_pl.lit.loading import load_bit, load_stage2
from brainit_pl.recon.chain import Reconstructor

log = logging.getLogger(__name__)


class ReconstructionCallback(Callback):
    """Reconstruct a validation subset every few epochs and every test image.

    Args:
        every_n_epochs: validation reconstructions every N epochs (0: never).
        n_images: validation images reconstructed (the first ones of the validation split).
        other: for a BIT run, the other branch's ``BITModule`` checkpoint; for a stage-2 run, the low-level
            BIT's (``None``: only the trained module's stage).
        stage2: for a low-level BIT run, a stage-2 checkpoint (stage ``semantic``; instead of ``other``).
        unclip, tiny_unclip: the stock unCLIP UNet of ``semantic_stock`` (see
            :class:`~brainit_pl.recon.chain.Reconstructor`).
        refine, tiny_refine: the optional SDXL refinement.
        dip_steps: DIP steps per image at validation (a preview: fewer than the 1,800 of the method).
        test_dip_steps: DIP steps per image at test.
        dip_lr: the DIP's Adam learning rate (larger than the method's 1e-3 for short previews).
        dip_batch: images inverted together.
        dip_channels: the DIP network's width.
        nets: metric networks of the test report (``"real"``, ``"tiny"``, or ``"none"`` to skip scoring).
        weights_dir: the weights folder.
        out_dir: where test reconstructions go (default ``<log dir>/reconstruct``).
        seed: seeds the DIP and the diffusion noise.
        test: reconstruct and score the test images at ``test`` (``False``: validation previews only, as the
            training configs use it: their ``test`` scores features, not pictures).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        n_images: int = 8,
        other: str | None = None,
        stage2: str | None = None,
        unclip: str | None = None,
        tiny_unclip: bool = False,
        refine: str | None = None,
        tiny_refine: bool = False,
        dip_steps: int = 300,
        test_dip_steps: int = 1800,
        dip_lr: float = 1e-3,
        dip_batch: int = 16,
        dip_channels: int = 128,
        nets: str = "real",
        weights_dir: str | None = None,
        out_dir: str | None = None,
        seed: int = 0,
        test: bool = True,
    ) -> None:
        require(every_n_epochs >= 0 and n_images >= 1, "every_n_epochs must be >= 0 and n_images >= 1")
        require(nets in ("real", "tiny", "none"), f"nets must be real, tiny or none, got {nets!r}")
        require(other is None or stage2 is None, "give the callback `other` or `stage2`, not both")
        self.every_n_epochs, self.n_images, self.other, self.stage2 = every_n_epochs, n_images, other, stage2
        self.chain_options = {
            "unclip": unclip,
            "tiny_unclip": tiny_unclip,
            "refine": refine,
            "tiny_refine": tiny_refine,
            "weights_dir": weights_dir,
            "dip_lr": dip_lr,
            "dip_batch": dip_batch,
            "dip_channels": dip_channels,
            "seed": seed,
        }
        self.dip_steps, self.test_dip_steps = dip_steps, test_dip_steps
        self.nets, self.weights_dir, self.out_dir = nets, weights_dir, out_dir
        self.test = test
        self._chain: Reconstructor | None = None
        self._subset: list[dict[str, torch.Tensor]] = []

    # -------------------------------------------------------------------------------------- the chain
    def _reconstructor(self, module: L.LightningModule) -> Reconstructor:
        if self._chain is None:
            self._chain = Reconstructor(**self._models(module), device=module.device, **self.chain_options)
        return self._chain

    def _models(self, module: L.LightningModule) -> dict[str, Any]:
        """The chain's models (Reconstructor keywords) around the module being trained or tested."""
        dev = module.device
        if hasattr(module, "chain_models"):  # BrainITModule: everything is loaded already
            return module.chain_models()
        if hasattr(module, "unet"):  # Stage2Module
            low = load_bit(Path(self.other), "lowlevel", dev) if self.other else None
            return {"lowlevel": low, "stage2": module}
        branch = getattr(getattr(module, "hparams", None), "branch", None)
        require(
            branch in ("lowlevel", "semantic"),
            "ReconstructionCallback needs a BITModule, a Stage2Module or a BrainITModule",
        )
        if branch == "semantic":
            require(self.stage2 is None, "a semantic BIT run previews with the stock UNet: drop `stage2`")
            low = load_bit(Path(self.other), "lowlevel", dev) if self.other else None
            log.info("previews of a stage-1 semantic BIT use the stock unCLIP UNet: stage semantic_stock")
            return {"lowlevel": low, "semantic_stock": module}
        models: dict[str, Any] = {"lowlevel": module}
        if self.stage2:
            models["stage2"] = load_stage2(Path(self.stage2), dev)
        elif self.other:
            models["semantic_stock"] = load_bit(Path(self.other), "semantic", dev)
        return models

    # ------------------------------------------------------------------------------------- validation
    def _due(self, trainer: L.Trainer) -> bool:
        return (
            self.every_n_epochs > 0
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.is_global_zero
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        held = sum(len(part["nsd_id"]) for part in self._subset)
        if not self._due(trainer) or held >= self.n_images:
            return
        take = self.n_images - held  # batches hold one subject each: keep them as separate parts
        part = {k: batch[k][:take].detach() for k in ("betas", "voxel_ids", "nsd_id", "subject")}
        self._subset.append({**part, "gt": _ground_truth(batch)[:take].detach().cpu()})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._subset:
            return
        from torchvision.utils import make_grid

        from brainit_pl.metrics.image import SSIM, PixCorr

        chain = self._reconstructor(pl_module)
        chain.dip_steps = self.dip_steps
        rows: dict[str, list[torch.Tensor]] = {"gt": []}
        for part in self._subset:
            images = chain(part)
            rows["gt"].append(part["gt"])
            for stage, pixels in images.items():
                rows.setdefault(stage, []).append(_to_224(pixels).cpu())
        self._subset = []
        gt = torch.cat(rows.pop("gt"))
        for stage, parts in rows.items():
            recon = torch.cat(parts)
            for name, metric in (("pixcorr", PixCorr()), ("ssim", SSIM())):
                metric.update(recons=recon, gt=gt)
                pl_module.log(f"val/recon_{stage}_{name}", float(metric.compute()), rank_zero_only=True)
        if trainer.logger is not None and hasattr(trainer.logger, "experiment"):
            grid = make_grid(torch.cat([gt, *(torch.cat(p) for p in rows.values())]), nrow=len(gt), padding=2)
            trainer.logger.experiment.add_image("val/reconstructions", grid, trainer.global_step)

    # ------------------------------------------------------------------------------------------- test
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.test:
            return
        # one folder for all ranks: rank 0's log dir, broadcast (the others may not know it)
        from brainit_pl.recon.reconstruct import claim_folder

        folder = self.out_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "reconstruct")
        self._out = Path(trainer.strategy.broadcast(folder, src=0))
        self._subjects: set[int] = set()
        chain = self._reconstructor(pl_module)
        self._settings = {
            "module": type(pl_module).__name__,
            "hparams": {k: str(v) for k, v in sorted(dict(pl_module.hparams).items())},
            "other": self.other,
            "stage2": self.stage2,
            "dip_steps": self.test_dip_steps,
            "dip_channels": self.chain_options["dip_channels"],
            "seed": self.chain_options["seed"],
            "stages": chain.stages,
        }
        if trainer.is_global_zero:  # resume an interrupted run, refuse a finished or different one
            claim_folder(self._out, self._settings, overwrite=False)
        trainer.strategy.barrier("reconstruction folder claimed")

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from brainit_pl.recon.reconstruct import reconstruct_missing

        if not self.test:
            return
        chain = self._reconstructor(pl_module)
        chain.dip_steps = self.test_dip_steps
        reconstruct_missing(self._out, batch, chain)
        self._subjects.add(int(batch["subject"][0]))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from brainit_pl.metrics.report import log_to_tensorboard
        from brainit_pl.recon.reconstruct import finish, mark_finished
        from brainit_pl.viz import log_png

        if not self.test:
            return
        chain = self._reconstructor(pl_module)
        subjects = _gather(trainer, self._subjects)
        trainer.strategy.barrier("reconstructions written")  # every rank's PNGs are on disk
        if not trainer.is_global_zero:
            return
        results = finish(self._out, chain.stages, subjects, self.nets, self.weights_dir, None)
        mark_finished(self._out, self._settings)
        for stage, result in results.items():
            if trainer.logger is not None:
                log_to_tensorboard(trainer.logger, result, prefix=f"test_{stage}", step=trainer.global_step)
        log_png(
            trainer.logger, "test/reconstructions", self._out / "reconstructions.png", trainer.global_step
        )
        log.info("test reconstructions (%s) in %s", ", ".join(chain.stages), self._out)


def _gather(trainer: L.Trainer, subjects: set[int]) -> list[int]:
    """The subjects every rank reconstructed (ranks hold shards of the test images)."""
    if trainer.world_size == 1:
        return sorted(subjects)
    import torch.distributed as dist

    parts: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(parts, sorted(subjects))
    return sorted({s for part in parts for s in part})


def _ground_truth(batch: dict) -> torch.Tensor:
    """The batch's stimuli at 224²: ``image_224``, else its largest size upsampled (a
    low-level run reads only 112²; its previews are then scored against the upsampled stimuli)."""
    sizes = sorted(
        int(k.split("_")[1]) for k in batch if k.startswith("image_") and k.split("_")[1].isdigit()
    )
    require(bool(sizes), "ReconstructionCallback compares with the stimuli: the batches hold no image_<size>")
    return _to_224(batch[f"image_{sizes[-1]}"])


def _to_224(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] == 224:
        return images.float()
    return torch.nn.functional.interpolate(images.float(), size=(224, 224), mode="bilinear", antialias=True)
