"""``brainit-pl test``: score the model's reconstructions of the shared test images, per subject.

The model's ``test_step`` returns ``{"recon": (B, 3, H, W) in [0, 1]}``; the ground truth is the batch's
``image_224`` (the 224² stimuli, as in MindEye2's evaluator). At the end of the test epoch this callback
writes ``metrics.md``, ``metrics.csv`` and ``metrics.json`` (the same report as ``brainit-pl evaluate``),
a ground truth vs reconstruction grid per subject, and logs the table to TensorBoard.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from brainit_pl.errors import BrainITError, require
from brainit_pl.metrics.bootstrap import bootstrap_ci
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL
from brainit_pl.metrics.report import format_value, log_to_tensorboard, make_results, write_reports
from brainit_pl.metrics.suite import build_eval_suite, build_feature_nets, per_image_values, summarize

log = logging.getLogger(__name__)


class TestEvaluation(Callback):
    """Score test reconstructions with the standard NSD suite and write the report.

    Args:
        protocol: ``"mindeye2"`` (default) or ``"braindiffuser"``.
        nets: metric networks: ``"real"`` (weight files, see data/README.md) or ``"tiny"`` (random twins,
            for smoke tests and the simulated demo — their numbers are not comparable with papers).
        weights_dir: folder of the real weight files (default ``$BRAINIT_WEIGHTS``).
        out_dir: where to write the report (default ``<log dir>/test``).
        grid_images: test images per subject drawn in ``recon_grid_subjNN.png`` (0: none).
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(
        self,
        protocol: str = DEFAULT_PROTOCOL,
        nets: str = "real",
        weights_dir: str | None = None,
        out_dir: str | None = None,
        grid_images: int = 8,
    ) -> None:
        self.protocol, self.nets, self.weights_dir = protocol, nets, weights_dir
        self.out_dir, self.grid_images = out_dir, grid_images

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require(
            trainer.world_size == 1,
            "test scoring runs on one device (per-subject suites do not shard); pass --trainer.devices 1",
        )
        self._nets = build_feature_nets(self.protocol, self.nets, self.weights_dir)
        self._suites: dict[int, Any] = {}
        self._ids: dict[int, set[int]] = defaultdict(set)
        self._grid: dict[int, list[list[torch.Tensor]]] = defaultdict(lambda: [[], []])  # [gt, recon]

    def _suite(self, subject: int, device: torch.device):
        if subject not in self._suites:
            suite = build_eval_suite(self.protocol, feature_nets=self._nets, retrieval=False)
            self._suites[subject] = suite.to(device)
        return self._suites[subject]

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "recon" not in outputs:
            raise BrainITError(
                f"{type(pl_module).__name__}.test_step must return {{'recon': images}} to be scored"
            )
        require("image_224" in batch, "test scoring needs the 224² stimuli: add 224 to data.image_sizes")
        recon = outputs["recon"].detach().float().clamp(0, 1)  # (B, 3, h, w)
        gt = batch["image_224"].float()  # (B, 3, 224, 224)
        for subject in batch["subject"].unique().tolist():
            rows = batch["subject"] == subject
            self._suite(subject, recon.device).update(recons=recon[rows], gt=gt[rows])
            self._ids[subject].update(batch["nsd_id"][rows].tolist())
            gt_rows, recon_rows = self._grid[subject]
            room = self.grid_images - sum(len(t) for t in gt_rows)
            if room > 0:
                gt_rows.append(gt[rows][:room].cpu())
                recon_rows.append(recon[rows][:room].cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require(bool(self._suites), "the test split produced no batches to score")
        per_subject = {f"subj{s:02d}": summarize(self._suites[s].compute()) for s in sorted(self._suites)}
        counts = {f"subj{s:02d}": len(self._ids[s]) for s in sorted(self._suites)}
        n_images = len(set().union(*self._ids.values()))
        ci = {  # 95% percentile bootstrap over images, 1000 resamples, seed 0 (bootstrap's defaults)
            f"subj{s:02d}": {n: bootstrap_ci(v) for n, v in per_image_values(self._suites[s]).items()}
            for s in sorted(self._suites)
        }
        ci_method = {"kind": "percentile bootstrap over images", "n_boot": 1000, "level": 0.95, "seed": 0}
        results = make_results(self.protocol, per_subject, n_images, ci=ci, ci_method=ci_method)
        out = Path(self.out_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "test"))
        write_reports(out, results, nets=self.nets, counts=counts)
        self._write_grids(out)
        if trainer.logger is not None:
            log_to_tensorboard(trainer.logger, results, prefix="test", step=trainer.global_step)
        mean = ", ".join(f"{k} {format_value(k, v)}" for k, v in results["mean"].items() if v is not None)
        log.info(
            "test (%s, %s nets, %d images): %s; report in %s", self.protocol, self.nets, n_images, mean, out
        )

    def _write_grids(self, out: Path) -> None:
        from brainit_pl.viz import save_image_grid

        for subject, (gt_rows, recon_rows) in self._grid.items():
            if gt_rows:
                save_image_grid(
                    out / f"recon_grid_subj{subject:02d}.png", [torch.cat(gt_rows), torch.cat(recon_rows)]
                )
