"""Stopping a training run cleanly when its loss stops being a number."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from brainit_pl.errors import BrainITError


def check_finite_loss(
    module: L.LightningModule, loss: Tensor, batch: dict[str, Tensor], batch_idx: int, what: str, fix: str
) -> None:
    """Raise a one-line BrainITError naming the step, epoch, batch, rank and images when ``loss`` is NaN/inf.

    Decided on every rank together (a rank that stopped alone would leave the others waiting in the next
    collective), before the optimizer step, so no non-finite update is ever applied or saved.

    Args:
        module: the LightningModule being trained (its trainer, step and rank are reported).
        loss: the step's loss.
        batch: the batch (its ``nsd_id`` are reported).
        batch_idx: the batch's index in the epoch.
        what: the loss's name in the message (e.g. ``"training loss"``).
        fix: what the user can do about it.
    """
    finite = module.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
    if not finite:
        ids = batch["nsd_id"].tolist()
        raise BrainITError(
            f"non-finite {what} ({float(loss)}) at global step {module.global_step} (epoch "
            f"{module.current_epoch}, batch {batch_idx} on rank {module.global_rank}; images {ids[:8]}"
            f"{' ...' if len(ids) > 8 else ''}); nothing from this step was saved — {fix}"
        )
