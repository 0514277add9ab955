"""The plumbing of ``brainit-pl transfer`` (:mod:`brainit_pl.workflows.transfer.run`): its inputs, data and trainings.

:class:`Plan` checks the base models and the new subject and builds each step's DataModule
(:class:`TableDataModule`: batches carry global voxel ids of the base models' table grown by the new
subject); :class:`Steps` runs a step unless OUT holds its finished result (same settings) and records it;
:func:`fit_module` trains one module and keeps the checkpoint of its last epoch (``--keep last``, the
authors') or of its best validation epoch (``--keep best``), with a per-epoch log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.errors import require
from brainit_pl.files import atomic_write_text

log = logging.getLogger(__name__)

STEPS = ("encoder", "v2c", "synthetic", "semantic", "lowlevel", "stage2", "reconstruct")

# Data settings taken from the base run's checkpoint (its DataModule's hyperparameters) ...
INHERITED_DATA = (
    "voxels_per_sample",
    "voxel_replacement",
    "average_repeats",
    "test_average_repeats",
    "image_sizes",
    "features",
    "batch_size",
    "global_batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
)
# ... or, for a checkpoint without them, the paper's (configs/subj01.yaml, encoder.yaml, stage2_subj01.yaml).
FALLBACK_DATA: dict[str, dict[str, Any]] = {
    "encoder": {"voxels_per_sample": 5000, "image_sizes": [224], "features": [], "batch_size": 32},
    "semantic": {"voxels_per_sample": 15000, "image_sizes": [], "features": ["clip"], "batch_size": 128},
    "lowlevel": {"voxels_per_sample": 15000, "image_sizes": [112], "features": [], "batch_size": 64},
    "stage2": {
        "voxels_per_sample": 15000,
        "image_sizes": [224],
        "features": [],
        "batch_size": 8,
    },  # × 8 accumulated
}


class TableDataModule(NSDDataModule):
    """An NSDDataModule of some subjects whose voxel ids are the rows of a larger voxel table.

    The transferred models' table holds the base subjects and S, but they train on S's data alone: the
    batches carry S's voxel ids *in that table* (``voxel_offsets`` from ``voxel_table``).

    Args:
        store: the store.
        voxel_table: subject → voxel count of the models' table (every subject of ``subjects`` in it).
        **kwargs: :class:`~brainit_pl.data.datamodule.NSDDataModule`'s other arguments.
    """

    def __init__(self, store: str, voxel_table: dict[int, int], **kwargs: Any) -> None:
        from brainit_pl.models.encoder import voxel_offsets

        super().__init__(store, **kwargs)
        require(
            all(voxel_table.get(s) == v for s, v in self.n_voxels.items()),
            f"the store's voxel counts {self.n_voxels} do not fit the models' voxel table {voxel_table}",
        )
        offsets = voxel_offsets(voxel_table)
        self.voxel_offsets = {s: offsets[s] for s in self.subjects}


class Plan:
    """The checked inputs of a transfer: base checkpoints, the new subject, its voxel table.

    Raises:
        BrainITError: S absent from the store or already in a base voxel table, base models of different
            voxel tables, a clusters file of other subjects (or not the base BITs'), a wrong branch.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        from brainit_pl.data.store import Store
        from brainit_pl.lit.checkpoints import file_digest
        from brainit_pl.models.v2c import load_clusters

        self.args, self.out, s = args, Path(args.out), args.subject
        self.store = Store(args.store)
        require(
            s in self.store.subjects,
            f"subject {s} is not in the store {self.store.root} (it has subjects {self.store.subjects})",
        )
        require(args.hours > 0, f"--hours must be positive, got {args.hours}")
        names = {"encoder": args.encoder, "semantic": args.semantic, "lowlevel": args.lowlevel}
        if args.stage2 is not None:
            names["stage2"] = args.stage2
        self.ckpt = {k: read_metadata(p, k) for k, p in names.items()}
        tables = {k: voxel_counts(c["hyper_parameters"]["n_voxels"]) for k, c in self.ckpt.items()}
        self.base = tables["encoder"]
        require(
            all(t == self.base for t in tables.values()),
            f"the base models have different voxel tables: {tables}; give models of the same subjects",
        )
        require(
            s not in self.base,
            f"subject {s} is already in the base models' voxel table (subjects {sorted(self.base)}): "
            "transfer needs base models trained without it",
        )
        for subject, count in self.base.items():
            found = self.store.subject(subject).n_voxels if subject in self.store.subjects else None
            require(
                found == count,
                f"base subject {subject} has {count} voxels in the models but {found or 'none'} in the "
                f"store {self.store.root}; use the store the base models were trained on",
            )
        for branch in ("semantic", "lowlevel"):
            found = self.ckpt[branch]["hyper_parameters"].get("branch")
            require(found == branch, f"--{branch} {names[branch]} is a {found} BIT checkpoint")
        clusters = load_clusters(args.clusters)
        require(
            clusters.n_voxels == self.base,
            f"the clusters in {args.clusters} were made for the voxel table {clusters.n_voxels} (subject: "
            f"voxels), the base models have {self.base}; give the base models' clusters.npz",
        )
        digest = file_digest(args.clusters)
        for branch in ("semantic", "lowlevel"):
            trained = self.ckpt[branch].get("brainit_bit", {}).get("clusters_sha1")
            require(
                trained == digest,
                f"--clusters {args.clusters} is not the clusters file the base {branch} BIT was trained with",
            )
        self.clusters = clusters
        self.new = {s: self.store.subject(s).n_voxels}
        self.table = dict(sorted({**self.base, **self.new}.items()))
        stage2 = self.ckpt.get("stage2", {}).get("hyper_parameters", {})
        self.tiny_unclip = bool(args.tiny_unclip or stage2.get("tiny_unclip", False))

    def data_settings(self, step: str, base: str) -> dict[str, Any]:
        """The DataModule settings of the base run ``base`` (its checkpoint's), for ``step``'s fallbacks."""
        saved = self.ckpt.get(base, {}).get("datamodule_hyper_parameters", {})
        return {**FALLBACK_DATA[step], **{k: saved[k] for k in INHERITED_DATA if k in saved}}

    def data(self, step: str, base: str, **overrides: Any) -> TableDataModule:
        """S's DataModule for ``step``, with the data settings of the base checkpoint ``base``."""
        settings = self.data_settings(step, base)
        if self.args.num_workers is not None:
            settings["num_workers"] = self.args.num_workers
        settings.update(
            subjects=[self.args.subject],
            hours=self.args.hours,
            val_fraction=self.args.val_fraction,
            seed=self.args.seed,
            **overrides,
        )
        dm = TableDataModule(str(self.store.root), self.table, **settings)
        dm.setup("fit")
        require(
            self.args.val_fraction == 0 or len(dm.samples["val"]) >= 2,
            f"hours={self.args.hours} with --val-fraction {self.args.val_fraction} leaves "
            f"{len(dm.samples['val'])} validation image(s) of subject {self.args.subject}; at least 2 are "
            "needed (they choose the best checkpoint): raise --val-fraction",
        )
        return dm


def read_metadata(path: Path, what: str) -> dict[str, Any]:
    """What the steps need of a base checkpoint: its model and data hyperparameters, its BIT record.

    The weights are read again by the step that uses them: a stage-2 checkpoint is ~10 GB.
    """
    from brainit_pl.lit.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path, what)
    return {
        k: ckpt[k] for k in ("hyper_parameters", "datamodule_hyper_parameters", "brainit_bit") if k in ckpt
    }


def voxel_counts(n_voxels: dict[Any, Any]) -> dict[int, int]:
    return {int(s): int(v) for s, v in sorted(n_voxels.items(), key=lambda kv: int(kv[0]))}


def file_identity(path: Path | None) -> dict[str, Any] | None:
    """What a finished step must share with a re-run: an input file's path, size and modification time."""
    if path is None:
        return None
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


# ------------------------------------------------------------------------------------------- steps
class Steps:
    """Runs each step once: a finished step (its ``result.json``) is skipped, if made with the same settings."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        if overwrite:
            for name in STEPS:
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "summary.json").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)

    def run(
        self, name: str, settings: dict[str, Any], fn: Callable[[Path], dict], *, resumable: bool = False
    ) -> dict[str, Any]:
        """``fn(folder)`` → metrics, unless done before; returns the step's record (settings, seconds, ...).

        Args:
            resumable: the step resumes an interrupted run by itself (else an unfinished folder is cleared).
        """
        folder, number = self.out / name, f"[{STEPS.index(name) + 1}/{len(STEPS)}] {name}"
        settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        record = folder / "result.json"
        if record.exists():
            saved = json.loads(record.read_text())
            differ = sorted(
                k for k in {*settings, *saved["settings"]} if saved["settings"].get(k) != settings.get(k)
            )
            require(
                not differ,
                f"{folder} was made with other settings ({', '.join(differ)}); pass --overwrite or choose "
                "another --out",
            )
            log.info("%s: done before (%.0f s), skipped", number, saved["seconds"])
            return saved
        if folder.exists() and not resumable:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        log.info("%s ...", number)
        start = time.perf_counter()
        result = {"settings": settings, **fn(folder)}
        result["seconds"] = time.perf_counter() - start
        atomic_write_text(record, json.dumps(result, indent=2) + "\n")
        log.info("%s: done in %.1f s", number, result["seconds"])
        return result


class EpochLog(L.Callback):
    """One log line per training epoch with its validation metrics (the progress bar is off outside a tty)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        shown = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        log.info("%s: epoch %d/%d %s", self.name, trainer.current_epoch + 1, trainer.max_epochs, shown)


def make_trainer(
    plan: Plan, folder: Path, epochs: int, monitor: str | None, mode: str, accumulate: int = 1
) -> L.Trainer:
    """A one-device Trainer logging to ``folder/tb``, keeping the best checkpoint on ``monitor`` (``None``:
    the last epoch's), ``accumulate`` micro-batches per optimizer step."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from brainit_pl.devices import resolve_device

    dev = resolve_device(plan.args.device)
    precision = plan.args.precision or ("bf16-mixed" if dev.type == "cuda" else "32-true")
    seed_run(plan)  # the training's draws do not depend on what building the module drew
    return L.Trainer(
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=[dev.index or 0] if dev.type == "cuda" else 1,
        precision=precision,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        logger=TensorBoardLogger(str(folder), name="tb", version=""),
        callbacks=[
            ModelCheckpoint(folder / "checkpoints", filename="best", monitor=monitor, mode=mode),
            LearningRateMonitor(),
            EpochLog(folder.name),
        ],
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=str(folder),
    )


def seed_run(plan: Plan) -> None:
    """Seed Python, numpy and torch with ``--seed`` (the new rows' random init, the training's draws)."""
    L.seed_everything(plan.args.seed, workers=True, verbose=False)


def fit_module(
    plan: Plan, module, dm, folder: Path, name: str, epochs: int, monitor: str, mode: str, accumulate: int = 1
) -> dict:
    """Train, keep the last (``--keep last``) or best epoch as ``folder/name``, score it on S's validation
    images when there are any; ``module`` ends with the kept weights."""
    require(epochs >= 1, f"the {name} training needs at least 1 epoch, got {epochs}")
    best = plan.args.keep == "best"
    trainer = make_trainer(plan, folder, epochs, monitor if best else None, mode, accumulate)
    trainer.fit(module, datamodule=dm)
    kept = trainer.checkpoint_callback.best_model_path  # without a monitor: the last epoch's
    metrics = {}
    if len(dm.samples["val"]):
        (metrics,) = trainer.validate(module, datamodule=dm, ckpt_path=kept if best else None, verbose=False)
    os.replace(kept, folder / name)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return {"val": {k: float(v) for k, v in metrics.items()}, "checkpoint": str(folder / name)}
