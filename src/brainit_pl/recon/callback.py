"""Reconstructions while a BIT trains and when it is tested (BRAINIT.md §6), in TensorBoard and on disk.

Attach to a ``BITModule`` run (``trainer.callbacks`` in the config). The module being trained is one end of
the chain (low-level → DIP, or semantic → unCLIP); ``other`` may name the other branch's checkpoint to run
the whole chain (low-level → semantic → refined, as configured):

* validation, every ``every_n_epochs`` epochs: a fixed subset (the first ``n_images`` validation images)
  is reconstructed with ``dip_steps`` DIP steps; ``val/recon_<stage>_pixcorr`` / ``_ssim`` are logged and a
  grid (ground truth | each stage) goes to TensorBoard as ``val/reconstructions``;
* test: every test image (``test_dip_steps``), saved as ``brainit-pl reconstruct`` saves them (PNGs and
  arrays per subject and stage, in ``<log dir>/reconstruct``), scored per stage with the metric suite
  (``metrics_<stage>/``) and logged to TensorBoard (``test_<stage>/...``).

Rank 0 does the validation reconstructions (the others skip them); test reconstruction runs on one device.
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
from brainit_pl.lit.loading import load_bit
from brainit_pl.recon.chain import Reconstructor

log = logging.getLogger(__name__)


class ReconstructionCallback(Callback):
    """Reconstruct a validation subset every few epochs and every test image.

    Args:
        every_n_epochs: validation reconstructions every N epochs (0: never).
        n_images: validation images reconstructed (the first ones of the validation split).
        other: the other branch's ``BITModule`` checkpoint (``None``: only this module's stage).
        unclip, tiny_unclip: the unCLIP model of the semantic stage (see :class:`~brainit_pl.recon.chain.Reconstructor`).
        refine, tiny_refine: the optional SDXL refinement.
        dip_steps: DIP steps per image at validation (a preview: fewer than the 1,800 of the method).
        test_dip_steps: DIP steps per image at test.
        dip_batch: images inverted together.
        dip_channels: the DIP network's width.
        nets: metric networks of the test report (``"real"``, ``"tiny"``, or ``"none"`` to skip scoring).
        weights_dir: the weights folder.
        out_dir: where test reconstructions go (default ``<log dir>/reconstruct``).
        seed: seeds the DIP and the diffusion noise.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        n_images: int = 8,
        other: str | None = None,
        unclip: str | None = None,
        tiny_unclip: bool = False,
        refine: str | None = None,
        tiny_refine: bool = False,
        dip_steps: int = 300,
        test_dip_steps: int = 1800,
        dip_batch: int = 16,
        dip_channels: int = 128,
        nets: str = "real",
        weights_dir: str | None = None,
        out_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        require(every_n_epochs >= 0 and n_images >= 1, "every_n_epochs must be >= 0 and n_images >= 1")
        require(nets in ("real", "tiny", "none"), f"nets must be real, tiny or none, got {nets!r}")
        self.every_n_epochs, self.n_images, self.other = every_n_epochs, n_images, other
        self.chain_options = {
            "unclip": unclip,
            "tiny_unclip": tiny_unclip,
            "refine": refine,
            "tiny_refine": tiny_refine,
            "weights_dir": weights_dir,
            "dip_batch": dip_batch,
            "dip_channels": dip_channels,
            "seed": seed,
        }
        self.dip_steps, self.test_dip_steps = dip_steps, test_dip_steps
        self.nets, self.weights_dir, self.out_dir = nets, weights_dir, out_dir
        self._chain: Reconstructor | None = None
        self._subset: list[dict[str, torch.Tensor]] = []

    # -------------------------------------------------------------------------------------- the chain
    def _reconstructor(self, module: L.LightningModule) -> Reconstructor:
        if self._chain is None:
            branch = getattr(getattr(module, "hparams", {}), "branch", None) or module.hparams.get("branch")
            require(branch in ("lowlevel", "semantic"), "ReconstructionCallback needs a BITModule to train")
            other_branch = "semantic" if branch == "lowlevel" else "lowlevel"
            other = load_bit(Path(self.other), other_branch, module.device) if self.other else None
            pair = {branch: module, other_branch: other}
            self._chain = Reconstructor(
                pair["lowlevel"], pair["semantic"], device=module.device, **self.chain_options
            )
        return self._chain

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
        keys = ("betas", "voxel_ids", "nsd_id", "subject", "image_224")
        require(
            "image_224" in batch,
            "ReconstructionCallback compares with the 224² stimuli: add 224 to data.image_sizes",
        )
        self._subset.append({k: batch[k][:take].detach() for k in keys})

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
            rows["gt"].append(part["image_224"].float().cpu())
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
        require(trainer.world_size == 1, "test reconstruction runs on one device; pass --trainer.devices 1")
        self._out = Path(
            self.out_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "reconstruct")
        )
        self._subjects: set[int] = set()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from brainit_pl.recon.reconstruct import save_batch

        chain = self._reconstructor(pl_module)
        chain.dip_steps = self.test_dip_steps
        save_batch(self._out, batch, chain(batch))
        self._subjects.add(int(batch["subject"][0]))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from brainit_pl.metrics.report import log_to_tensorboard
        from brainit_pl.recon.reconstruct import finish

        chain = self._reconstructor(pl_module)
        results = finish(self._out, chain.stages, sorted(self._subjects), self.nets, self.weights_dir, None)
        for stage, result in results.items():
            if trainer.logger is not None:
                log_to_tensorboard(trainer.logger, result, prefix=f"test_{stage}", step=trainer.global_step)
        log.info("test reconstructions (%s) in %s", ", ".join(chain.stages), self._out)


def _to_224(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] == 224:
        return images.float()
    return torch.nn.functional.interpolate(images.float(), size=(224, 224), mode="bilinear", antialias=True)
