"""A linear baseline decoder: fMRI → a low-resolution image.

Why it exists: it is the floor every Brain-IT number must beat, and the smallest real model that
exercises the whole training path (store → NSDDataModule → multi-subject batches → DDP → checkpoints)
before the BITs arrive. It uses the same input convention as the BIT (docs/method.md §4): each voxel v of
every subject owns a learned embedding e_v, a sample is a set of (voxel id, activation) pairs, and the
voxels are pooled as mean_v(x_v · e_v). With no attention, this is a per-subject linear map from voxels
to a D-dim code (rank ≤ D), followed by a shared linear read-out of the image pixels.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


def pixel_correlation(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson r between each predicted and target image over all pixels, → (B,)."""
    p = pred.flatten(1) - pred.flatten(1).mean(1, keepdim=True)
    t = target.flatten(1) - target.flatten(1).mean(1, keepdim=True)
    return (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(1e-8)


class LinearDecoder(L.LightningModule):
    """Voxel-embedding linear decoder of ``image_size``² RGB images, trained with MSE.

    Args:
        n_voxels: subject → voxel count (linked from the DataModule; sets the voxel table size).
        width: D, the voxel-embedding width.
        image_size: side of the predicted image (the target is the 112² stimulus, area-downsampled).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        width: int = 64,
        image_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        total = sum(n_voxels.values())
        self.voxel_embed = nn.Embedding(total, width)
        nn.init.normal_(self.voxel_embed.weight, std=0.1 / width**0.5)
        self.readout = nn.Linear(width, 3 * image_size * image_size)
        self.image_size = image_size

    def forward(self, betas: torch.Tensor, voxel_ids: torch.Tensor) -> torch.Tensor:
        """(B, V) activations at (B, V) global voxel ids → (B, 3, S, S) images in [0, 1]."""
        tokens = betas.unsqueeze(-1) * self.voxel_embed(voxel_ids)  # (B, V, D)
        code = tokens.mean(1)  # (B, D)
        logits = self.readout(code).view(-1, 3, self.image_size, self.image_size)
        return torch.sigmoid(logits)

    def _target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Area interpolation is the anti-aliased downsampling for integer factors (112 → 32 is not,
        # but area still averages every source pixel, which is what a low-res target should be).
        return F.interpolate(batch["image_112"], size=self.image_size, mode="area")

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self(batch["betas"], batch["voxel_ids"])
        target = self._target(batch)
        loss = F.mse_loss(pred, target)
        bs = pred.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=bs, sync_dist=stage != "train", prog_bar=stage != "test")
        if stage != "train":
            r = pixel_correlation(pred.float(), target.float()).mean()
            self.log(f"{stage}/pixcorr", r, batch_size=bs, sync_dist=True, prog_bar=True)
        return loss, pred

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns the reconstructions, which :class:`~brainit_pl.metrics.callback.TestEvaluation` scores."""
        return {"recon": self._step(batch, "test")[1]}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {
            "nsd_id": batch["nsd_id"],
            "subject": batch["subject"],
            "image": self(batch["betas"], batch["voxel_ids"]),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
