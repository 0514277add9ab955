"""The held-out subject S of ``transfer-demo``: checks of its data and of the all-data models, and its scores.

Shared by :mod:`brainit_pl.workflows.transfer.demo` and ``benchmarks/data_efficiency.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainit_pl.errors import require
from brainit_pl.files import load_module
from brainit_pl.workflows.demo import best_checkpoint

MIN_TRAIN_IMAGES = 4  # fewer is not a limited-data experiment but noise
BRANCHES = ("semantic", "lowlevel")


def check_subject(
    store: Path, subject: int | None, hours: float, val_fraction: float, seed: int
) -> tuple[int, list[int]]:
    """S (default: the store's last subject) and the base subjects, once S's data is known to fit ``hours``.

    Raises:
        BrainITError: S not in the store, no other subject, too little of S's data in its first ``hours``.
    """
    import numpy as np

    from brainit_pl.data.splits import split_subject
    from brainit_pl.data.store import Store

    opened = Store(store)
    subject = opened.subjects[-1] if subject is None else subject
    require(
        subject in opened.subjects,
        f"subject {subject} is not in the store {store}: choose --subject among {opened.subjects}",
    )
    base = [s for s in opened.subjects if s != subject]
    require(bool(base), f"the store {store} holds subject {subject} only: the base models need others")
    require(hours > 0, f"--hours must be positive, got {hours}")
    sub = opened.subject(subject)
    split = split_subject(  # raises for more hours (sessions) than S has
        subject, sub.trials, sub.trials_per_session, hours=hours, val_fraction=val_fraction, seed=seed
    )
    n_train, n_val = (len(np.unique(sub.trials["nsd_id"][rows])) for rows in (split.train, split.val))
    require(
        n_train >= MIN_TRAIN_IMAGES and n_val >= 2,
        f"subject {subject} has too little data for --hours {hours}: {n_train} training and {n_val} "
        f"validation images (non-shared) where at least {MIN_TRAIN_IMAGES} and 2 are needed; raise --hours "
        "(or --val-fraction, for the validation images)",
    )
    return subject, base


def demo_checkpoints(root: Path | None) -> dict[str, Path] | None:
    """``make demo``'s BIT checkpoints in ``root`` (``<branch>/bit/fit``); ``None`` if one is unfinished."""
    if root is None:
        return None
    runs = {b: Path(root) / b / "bit" / "fit" for b in BRANCHES}
    if not all((run / "done").exists() for run in runs.values()):
        return None
    return {b: best_checkpoint(run) for b, run in runs.items()}


def check_table(ckpts: dict[str, Path], store: Path, subject: int) -> None:
    """All-data BITs must hold S and the store's voxel counts (a demo of another store is refused)."""
    from brainit_pl.data.store import Store
    from brainit_pl.lit.checkpoints import read_checkpoint

    opened = Store(store)
    wanted = {s: opened.subject(s).n_voxels for s in opened.subjects}
    for branch, ckpt in ckpts.items():
        saved = read_checkpoint(ckpt, "BITModule")["hyper_parameters"]["n_voxels"]
        table = {int(s): int(v) for s, v in saved.items()}
        require(
            subject in table and all(wanted.get(s) == v for s, v in table.items()),
            f"the all-data {branch} BIT {ckpt} was trained on the voxel table {table}, not on the store "
            f"{store} ({wanted}); give --all-data the demo run of this store",
        )


def score_features(ckpt: Path, store: Path, subject: int, kind: str = "bit") -> dict[str, float]:
    """A BIT's (or baseline's) test metrics on S's shared images, whichever subjects its voxel table holds.

    Args:
        kind: ``bit`` / ``mindeye2`` (a :class:`~brainit_pl.lit.bit.BITModule`) or ``ridge``
            (a :class:`~brainit_pl.lit.ridge.RidgeModule`).

    Returns:
        ``test/clip_cos`` and ``test/clip_2way``, or ``test/vgg_2way``; and ``test/loss``.
    """
    from brainit_pl.lit.checkpoints import read_checkpoint

    if kind == "ridge":
        from brainit_pl.lit.ridge import RidgeModule as Module
    else:
        from brainit_pl.lit.bit import BITModule as Module
    saved = read_checkpoint(ckpt, Module.__name__).get("datamodule_hyper_parameters", {})
    return test_on_subject(load_module(Module, ckpt), saved, store, subject)


def test_on_subject(module, saved: dict[str, Any], store: Path, subject: int) -> dict[str, float]:
    """``trainer.test`` of ``module`` on S's shared images; data settings of its run (``saved``), S alone.

    The batches carry S's voxel ids in the module's table (:class:`~brainit_pl.workflows.transfer.plan.TableDataModule`),
    so a model of several subjects is scored on S only.
    """
    import logging

    import lightning as L

    from brainit_pl.workflows.transfer.plan import INHERITED_DATA, TableDataModule

    settings = {k: saved[k] for k in INHERITED_DATA if k in saved}
    settings.update(num_workers=0, persistent_workers=False)  # one short pass: no worker start-up
    table = module.encoder.n_voxels if hasattr(module, "encoder") else module.n_voxels
    dm = TableDataModule(str(store), table, subjects=[subject], **settings)
    quiet, level = logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.pytorch").level
    quiet.setLevel(logging.WARNING)  # no "GPU available: ..." banner per scored model
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    finally:
        quiet.setLevel(level)
    return {k: float(v) for k, v in metrics.items()}
