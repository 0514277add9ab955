"""The trained Brain-IT as one LightningModule, for ``brainit-pl test`` and ``predict`` (docs/method.md §6).

It wraps what the two training stages produced — the low-level BIT and the stage-2 model (the adapted
semantic BIT with its fine-tuned unCLIP UNet), which share the V2C clusters and the voxel table — and,
only when asked for, a stage-1 semantic BIT for the "without adapted CLIP" ablation. It trains nothing.
The :class:`~brainit_pl.recon.callback.ReconstructionCallback` in the test config drives reconstruction
and scoring (``configs/test_subj01.yaml``; ``configs/sim/test_*.yaml`` on the simulated NSD):

    brainit-pl test --config configs/test_subj01.yaml \
        --model.init_args.lowlevel LOW.ckpt --model.init_args.stage2 S2.ckpt

Under DDP every rank reconstructs its shard of the shared test images and rank 0 scores them all.
``predict`` returns the predicted features of each branch (``lowlevel_tokens``, ``semantic_tokens``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from brainit_pl.errors import require
from brainit_pl.lit.loading import load_bit, load_stage2
from brainit_pl.models.v2c import shared_voxel_table


class BrainITModule(L.LightningModule):
    """Low-level BIT + stage-2 model from their checkpoints (and the optional stock-UNet ablation).

    Args:
        n_voxels: subject → voxel count (linked from the DataModule); must be the checkpoints' table.
        lowlevel: a low-level ``BITModule`` checkpoint (stage ``lowlevel``: DIP).
        stage2: a ``Stage2Module`` checkpoint (stage ``semantic``: the method's unCLIP sampling).
        semantic_stock: a stage-1 semantic ``BITModule`` checkpoint, sampled with the stock unCLIP UNet of
            the callback's ``unclip`` / ``tiny_unclip`` (stage ``semantic_stock``: the ablation).
    """

    def __init__(
        self,
        n_voxels: dict[int, int] | None = None,
        lowlevel: str | None = None,
        stage2: str | None = None,
        semantic_stock: str | None = None,
    ) -> None:
        super().__init__()
        require(
            lowlevel is not None or stage2 is not None,
            "BrainITModule needs trained models: set model.init_args.lowlevel and model.init_args.stage2 "
            "(checkpoints of `brainit-pl fit`)",
        )
        self.save_hyperparameters()
        cpu = torch.device("cpu")
        self.lowlevel = load_bit(Path(lowlevel), "lowlevel", cpu) if lowlevel else None
        self.stage2 = load_stage2(Path(stage2), cpu) if stage2 else None
        self.semantic_stock = load_bit(Path(semantic_stock), "semantic", cpu) if semantic_stock else None
        names = {"lowlevel": self.lowlevel, "stage-2": self.stage2, "stage-1 semantic": self.semantic_stock}
        self.n_voxels = shared_voxel_table({k: m for k, m in names.items() if m is not None})
        if n_voxels is not None:
            data = {int(s): int(v) for s, v in n_voxels.items()}
            require(
                data == self.n_voxels,
                f"the data has voxel counts {data} but the checkpoints were trained on {self.n_voxels}: use "
                "the store (and subjects) they were trained on",
            )
        self.requires_grad_(False)
        self.eval()

    def chain_models(self) -> dict[str, Any]:
        """The :class:`~brainit_pl.recon.chain.Reconstructor` keywords of these models."""
        return {"lowlevel": self.lowlevel, "stage2": self.stage2, "semantic_stock": self.semantic_stock}

    def on_test_start(self) -> None:
        found = any(type(c).__name__ == "ReconstructionCallback" for c in self.trainer.callbacks)
        require(
            found,
            "`test` of BrainITModule reconstructs through the ReconstructionCallback: add it to "
            "trainer.callbacks (configs/test_subj01.yaml does)",
        )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Nothing here: the ReconstructionCallback reconstructs and saves each test batch."""

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The predicted features of a batch: ``lowlevel_tokens`` (B, 7190, w), ``semantic_tokens`` (B, 256, D)."""
        out = {"nsd_id": batch["nsd_id"], "subject": batch["subject"]}
        if self.lowlevel is not None:
            out["lowlevel_tokens"] = self.lowlevel(batch["betas"], batch["voxel_ids"])
        if self.stage2 is not None:
            out["semantic_tokens"] = self.stage2(batch["betas"], batch["voxel_ids"])
        return out

    def configure_optimizers(self) -> None:
        """Nothing trains: BrainITModule is for test and predict."""
        return None
