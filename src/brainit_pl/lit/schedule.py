"""The stage-1 learning-rate schedule of both BITs (docs/method.md §5).

Epoch e < W (W = 15 warm-up epochs) trains at lr · (f0 + (1 − f0)(e / W)³) with f0 = 1e-3; from epoch W on,
ReduceLROnPlateau (×0.1 after 5 epochs without a better validation loss).

Why one class and not ``SequentialLR``: ``SequentialLR`` cannot chain a ``ReduceLROnPlateau``. Its
``state_dict`` (``__dict__`` without the optimizer) carries the warm-up position too. Who steps it, and
when, matters for exact resumption: see :class:`~brainit_pl.lit.bit.BITModule` (it steps the scheduler
itself right after the epoch-end validation, *before* the checkpoint of that epoch is written).
"""

from __future__ import annotations

from typing import SupportsFloat

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from brainit_pl.errors import require


def warmup_factor(epoch: int, warmup_epochs: int, start_factor: float) -> float:
    """f0 + (1 − f0)(epoch / W)³ during the warm-up, 1 after it."""
    if epoch >= warmup_epochs:
        return 1.0
    return start_factor + (1.0 - start_factor) * (epoch / warmup_epochs) ** 3


class CubicWarmupPlateau(ReduceLROnPlateau):
    """Cubic warm-up over whole epochs, then ReduceLROnPlateau on the monitored validation value.

    Stepped once per epoch with the validation metric (Lightning does this for plateau schedulers).
    During the warm-up the metric is ignored; the plateau bookkeeping starts at epoch ``warmup_epochs``.

    Args:
        optimizer: its param groups' current ``lr`` are the peak learning rates.
        warmup_epochs: W (0: no warm-up).
        start_factor: f0, the fraction of the peak rate in epoch 0.
        **plateau: ``ReduceLROnPlateau`` options (``mode``, ``factor``, ``patience``, ...).
    """

    def __init__(
        self, optimizer: Optimizer, warmup_epochs: int = 15, start_factor: float = 1e-3, **plateau
    ) -> None:
        require(warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {warmup_epochs}")
        require(0 < start_factor <= 1, f"start_factor must be in (0, 1], got {start_factor}")
        self.warmup_epochs, self.start_factor = warmup_epochs, start_factor
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, **plateau)
        self._set_epoch_lr(0)

    def _set_epoch_lr(self, epoch: int) -> None:
        factor = warmup_factor(epoch, self.warmup_epochs, self.start_factor)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, metrics: SupportsFloat | None, epoch: int | None = None) -> None:  # type: ignore[override]
        """End of an epoch: ``self.last_epoch`` epochs are done; set the rate of the next one.

        ``metrics`` ``None`` (no validation) advances the warm-up and then keeps the rate.
        """
        if self.last_epoch + 1 <= self.warmup_epochs:
            self.last_epoch += 1
            self._set_epoch_lr(self.last_epoch)
        elif metrics is None:
            self.last_epoch += 1
        else:
            super().step(metrics)
