"""NSDDataModule: multi-subject NSD batches streamed from a prepared store (``brainit-pl prepare``).

Splits, hour subsets and repeat averaging follow :mod:`brainit_pl.data.splits`; batches are read by
:mod:`brainit_pl.data.datasets`, one h5py read per batch, in worker processes, without ever loading a
subject's whole betas matrix.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from brainit_pl.data.cache import BACKBONES, FeatureCache, cache_path
from brainit_pl.data.datasets import BatchDataset, BatchPlan
from brainit_pl.data.external import ExternalData
from brainit_pl.data.splits import SPLITS, SampleTable, SubjectSplit, make_samples, split_subject
from brainit_pl.data.store import ALL_IMAGE_SIZES, Store
from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)

EXTERNAL_MODES = ("concat", "ratio")

# Lightning stage → the splits it needs (None = every split).
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: SPLITS,
}


def per_device_batch_size(global_batch_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    """The per-device batch that keeps ``global_batch_size`` samples per optimizer step.

    Args:
        global_batch_size: samples per optimizer step over all devices (the paper's 128 / 64 / 64).
        world_size: devices × nodes (DDP ranks).
        accumulate: micro-batches accumulated per optimizer step (``accumulate_grad_batches``).

    Raises:
        BrainITError: ``global_batch_size`` not a positive multiple of ``world_size · accumulate``.
    """
    parts = world_size * accumulate
    require(
        global_batch_size >= 1 and world_size >= 1 and accumulate >= 1 and global_batch_size % parts == 0,
        f"global_batch_size {global_batch_size} is not a positive multiple of world_size {world_size} × "
        f"accumulate_grad_batches {accumulate}: choose devices and accumulation that divide it",
    )
    return global_batch_size // parts


class NSDDataModule(L.LightningDataModule):
    """Train / val / test batches of one or more subjects of a prepared NSD store.

    Splits (per subject): **test** = every trial of a shared image, from all sessions in the store;
    **val** = ``val_fraction`` of the non-shared *images* of the ``hours`` subset (split by image, so no
    repeat of a val image is in train); **train** = the other non-shared images of the subset. ``hours``
    limits train/val only: the test split is always the full shared set, which is how the published
    limited-data (1 h) numbers are measured. A sample is one image of one subject, its betas averaged
    over its repeats (``average_repeats`` / ``test_average_repeats``), or one trial when not averaged.

    Voxels and batching — a choice: with ``voxels_per_sample=k``, each training sample draws k of its
    subject's voxels uniformly (with replacement by default, as the BIT does with k = 15000; the encoder
    uses k = 5000), so every sample has the same shape and batches mix subjects freely. With ``None``,
    and always in val/test, a sample carries all its subject's voxels and batches are **per-subject
    buckets** (shuffled buckets in train, ordered in val/test): no padding and no padding mask in any
    model, at the cost of batches that each hold a single subject.

    External images: with ``external`` (a ``synthesize-fmri`` folder), a train epoch of n real samples also
    has external slots, shuffled together with the real samples (docs/method.md §1). ``external_mode``
    says how many and which images: ``concat`` (the authors' base trainings, their concatenated dataset):
    every external image once per epoch, N slots for N images (about 1 real : 2 synthetic on NSD);
    ``ratio`` (the authors' transfer): ``round(external_ratio · n)`` slots, each drawing its image
    uniformly with replacement (1 real : 3 synthetic with ``external_ratio`` 3). Either way each slot draws
    its subject uniformly at every draw and carries that subject's synthetic betas at k drawn voxels, like
    a real sample. Val and test never hold external samples.

    Batch size: ``batch_size`` is the per-device batch; with ``global_batch_size`` the per-device batch is
    computed at :meth:`setup` from the trainer, ``global_batch_size // (world_size · accumulate_grad_batches)``
    (:func:`per_device_batch_size`), so that the paper's batch holds on any number of GPUs.

    Each batch is a dict (B samples, k voxels or V_s = all voxels of the batch's subject):
    ``betas`` (B, k) float32, ``voxel_ids`` (B, k) int64 global voxel ids (``voxel_offsets[subject]`` +
    local index), ``subject``, ``nsd_id`` (0-based 73k id; ``-1 - row`` for external image ``row``),
    ``n_repeats`` (1 for external samples): (B,) int64, ``external`` (B,) bool (which samples are external),
    ``image_224`` / ``image_112`` (B, 3, S, S) float32 in [0, 1] for the sizes in ``image_sizes``, and
    ``<name>_tokens`` (B, T, D) float32 for each feature cache in ``features`` (``clip_tokens``: 256 × 1664).
    See :class:`~brainit_pl.data.datasets.BatchDataset`.

    Randomness (shuffles, val draw, voxel draws) depends only on ``seed``, the epoch and the batch's
    global number: the same with any number of workers. Under DDP each rank reads a disjoint shard of the
    batches (see :class:`~brainit_pl.data.datasets.BatchPlan`).

    Args:
        store: a store folder written by ``brainit-pl prepare``.
        subjects: subjects to use (default: every subject in the store); kept sorted in ``self.subjects``.
        hours: limited-data subset of train/val: ``None`` = all sessions, ``>= 1`` = the first
            ``round(hours)`` sessions, ``0 < hours < 1`` = the first ``round(hours · trials_per_session)``
            trials of session 1 (0.5 / 0.25 = 30 / 15 min).
        voxels_per_sample: k voxels drawn per training sample, or ``None`` for all voxels.
        voxel_replacement: draw the k voxels with replacement (uniformly); without needs k <= every V.
        average_repeats: average each train/val image's trials into one sample (else one per trial).
        test_average_repeats: the same for the test split.
        val_fraction: fraction of the non-shared images held out for validation, in [0, 1).
        image_sizes: stimulus sizes to include (subset of 224, 112 and, where the store holds it, 256).
        features: precomputed image features to include, from the store's feature caches
            (``"clip"``: ``STORE/features_clip.h5``, written by ``brainit-pl extract-features``).
        batch_size: training batch size per device (ignored when ``global_batch_size`` is set; ``None``
            then).
        global_batch_size: training batch size summed over devices and accumulated micro-batches
            (``None``: ``batch_size`` per device); it must be a multiple of world size × accumulation.
        eval_batch_size: val/test batch size per device (default: the training one).
        num_workers: DataLoader worker processes (each re-opens the HDF5 files).
        seed: seed of the val draw, the shuffles and the voxel draws.
        persistent_workers: keep workers alive between epochs (with ``num_workers > 0``).
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        external: a synthetic-fMRI folder (``brainit-pl synthesize-fmri``) whose images join the training
            batches; needs ``voxels_per_sample``, synthetic fMRI of every chosen subject and, with
            ``features``, the folder's own caches (``brainit-pl extract-features --store FOLDER``).
        external_mode: ``"concat"`` (every external image once per epoch) or ``"ratio"``
            (``external_ratio`` slots per real sample, images drawn with replacement).
        external_ratio: external slots per real training sample (>= 0), with ``external_mode: ratio``.

    Attributes:
        n_voxels: subject → voxel count V_s (known right after ``__init__``, for linking into models).
        voxel_offsets: subject → first global voxel id (cumulative over ``subjects`` in sorted order).
        total_voxels: the sum of ``n_voxels``.
        feature_shapes: feature name → (T, D) of each image's tokens (e.g. ``{"clip": (256, 1664)}``).
    """

    def __init__(
        self,
        store: str,
        subjects: list[int] | None = None,
        hours: float | None = None,
        voxels_per_sample: int | None = None,
        voxel_replacement: bool = True,
        average_repeats: bool = True,
        test_average_repeats: bool = True,
        val_fraction: float = 0.05,
        image_sizes: list[int] = [],  # noqa: B006 - never mutated (copied); a list keeps the CLI schema plain
        features: list[str] = [],  # noqa: B006 - never mutated (copied), as image_sizes
        batch_size: int | None = 32,
        global_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        external: str | None = None,
        external_mode: Literal["concat", "ratio"] = "ratio",
        external_ratio: float = 3.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.store = Store(store)
        present = self.store.subjects
        chosen = sorted(present if subjects is None else {int(s) for s in subjects})
        unknown = [s for s in chosen if s not in present]
        require(
            not unknown,
            f"subject(s) {unknown} not in the store {self.store.root} (it has subjects {present})",
        )
        require(
            bool(chosen), f"no subjects chosen from the store {self.store.root} (it has subjects {present})"
        )
        require(hours is None or hours > 0, f"hours must be positive (or null for all sessions), got {hours}")
        require(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
        require(
            batch_size is not None or global_batch_size is not None,
            "set data.batch_size (per device) or data.global_batch_size",
        )
        require(batch_size is None or batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
        require(
            eval_batch_size is None or eval_batch_size >= 1,
            f"eval_batch_size must be >= 1, got {eval_batch_size}",
        )
        require(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        bad_sizes = [s for s in image_sizes if s not in ALL_IMAGE_SIZES]
        require(not bad_sizes, f"image_sizes {bad_sizes} unknown; choose from {list(ALL_IMAGE_SIZES)}")
        require(
            voxels_per_sample is None or voxels_per_sample >= 1,
            f"voxels_per_sample must be >= 1, got {voxels_per_sample}",
        )
        bad_features = [f for f in features if f not in BACKBONES]
        require(not bad_features, f"features {bad_features} unknown; choose from {list(BACKBONES)}")
        if image_sizes or features:
            self.store.images  # noqa: B018 - fail now (one line) if the store has no image file
        for size in image_sizes:  # or not this size (256² only from the 425² stimuli)
            self.store.images.check_size(size)
        # Opened (and checked against the image store) now, so a missing or stale cache fails before fit.
        self.features: dict[str, FeatureCache] = {
            name: FeatureCache(cache_path(self.store.root, name), self.store.images)
            for name in dict.fromkeys(features)
        }
        self.feature_shapes: dict[str, tuple[int, int]] = {
            name: (cache.n_tokens, cache.width) for name, cache in self.features.items()
        }

        self.subjects: list[int] = chosen
        # Opening a subject reads only its small tables (trials, voxel coordinates), not the betas.
        self.n_voxels: dict[int, int] = {s: self.store.subject(s).n_voxels for s in chosen}
        starts = np.cumsum([0] + [self.n_voxels[s] for s in chosen])
        self.voxel_offsets: dict[int, int] = {s: int(o) for s, o in zip(chosen, starts)}
        self.total_voxels: int = int(starts[-1])
        if voxels_per_sample is not None and not voxel_replacement:
            small = {s: v for s, v in self.n_voxels.items() if v < voxels_per_sample}
            require(
                not small,
                f"voxels_per_sample={voxels_per_sample} without replacement exceeds the voxel counts {small}; "
                "lower it or set voxel_replacement=true",
            )
        require(
            external is None or voxels_per_sample is not None,
            "external images need voxels_per_sample (k voxels per sample, so real and synthetic samples "
            "of any subject share a batch); set it, or leave external unset",
        )
        require(0 <= external_ratio < np.inf, f"external_ratio must be finite and >= 0, got {external_ratio}")
        require(
            external_mode in EXTERNAL_MODES,
            f"external_mode must be one of {EXTERNAL_MODES}, got {external_mode!r}",
        )
        self.external_mode = external_mode
        self.external = (
            None if external is None else ExternalData(external, self.n_voxels, features, self.store.root)
        )
        for size in image_sizes if self.external is not None else ():
            self.external.synthetic.image_store.check_size(size)
        self.external_ratio = external_ratio
        self.hours, self.val_fraction, self.seed = hours, val_fraction, seed
        self.voxels_per_sample, self.voxel_replacement = voxels_per_sample, voxel_replacement
        self.average = {"train": average_repeats, "val": average_repeats, "test": test_average_repeats}
        self.image_sizes = tuple(int(s) for s in image_sizes)
        self.global_batch_size = global_batch_size
        self.batch_size = (
            batch_size if global_batch_size is None else per_device_batch_size(global_batch_size)
        )
        self._eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.samples: dict[str, SampleTable] = {}

    # ----------------------------------------------------------------------------------------- splits
    def subject_split(self, subject: int) -> SubjectSplit:
        """The train / val / test store rows of one subject (cheap: trial-table bookkeeping only)."""
        sub = self.store.subject(subject)
        return split_subject(
            subject,
            sub.trials,
            sub.trials_per_session,
            hours=self.hours,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the sample tables of the splits ``stage`` needs.

        Raises:
            BrainITError: a subject with no training images (train needed) or no shared-image trials
                (test needed), saying which subject and why.
        """
        splits = STAGE_SPLITS.get(stage, SPLITS)
        if self.global_batch_size is not None and self.trainer is not None:
            self.batch_size = per_device_batch_size(
                self.global_batch_size, self.trainer.world_size, self.trainer.accumulate_grad_batches
            )
        per_subject = {s: self.subject_split(s) for s in self.subjects}
        for s, split in per_subject.items():
            self._check_split(s, split, splits)
        nsd_id = {s: self.store.subject(s).trials["nsd_id"] for s in self.subjects}
        for name in splits:
            self.samples[name] = SampleTable.concat(
                [
                    make_samples(s, per_subject[s].rows(name), nsd_id[s], average=self.average[name])
                    for s in self.subjects
                ]
            )
        self._log_summary(per_subject, splits)

    def _check_split(self, subject: int, split: SubjectSplit, splits: tuple[str, ...]) -> None:
        sub = self.store.subject(subject)
        nsd_id = sub.trials["nsd_id"]
        if "train" in splits and len(split.train) == 0:
            n_shared = int(sub.trials["shared"][split.selected].sum())
            n_val = len(np.unique(nsd_id[split.val]))
            raise BrainITError(
                f"hours={self.hours} leaves 0 training images for subject {subject}: {len(split.selected)} trials "
                f"selected, {n_shared} of them shared (test) images, {n_val} image(s) held out for validation "
                f"(val_fraction={self.val_fraction}); use more hours or a smaller val_fraction"
            )
        if "test" in splits and len(split.test) == 0:
            raise BrainITError(
                f"subject {subject} has no test trials: none of its {sub.n_trials} trials in {self.store.root} "
                "shows a shared image (trials/shared is all false)"
            )

    @rank_zero_only
    def _log_summary(self, per_subject: dict[int, SubjectSplit], splits: tuple[str, ...]) -> None:
        for s, split in per_subject.items():
            nsd_id = self.store.subject(s).trials["nsd_id"]
            parts = [
                f"{name} {len(np.unique(nsd_id[split.rows(name)]))} images / {len(split.rows(name))} trials"
                for name in splits
            ]
            log.info("subject %d: %d voxels, hours=%s; %s", s, self.n_voxels[s], self.hours, ", ".join(parts))
        if self.external is not None and "train" in splits:
            n_real = len(self.samples["train"])
            log.info(
                "external (%s): %d slots per epoch beside %d real samples (%s)",
                self.external_mode,
                self._n_external(n_real),
                n_real,
                self.external.root,
            )

    @property
    def eval_batch_size(self) -> int:
        """The val/test batch per device: ``eval_batch_size``, else the training one."""
        return self._eval_batch_size or self.batch_size

    def _n_external(self, n_real: int) -> int:
        """External slots of a train epoch with ``n_real`` real samples."""
        if self.external is None:
            return 0
        if self.external_mode == "concat":
            return self.external.n_images
        return round(self.external_ratio * n_real)

    # ------------------------------------------------------------------------------------ dataloaders
    def make_dataloader(self, split: str, *, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The DataLoader of ``split`` for one rank of ``world_size`` (the hooks pass the trainer's).

        Raises:
            BrainITError: ``split`` unknown, or not built by :meth:`setup` yet.
        """
        require(split in SPLITS, f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.samples:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        samples = self.samples[split]
        require(
            len(samples) == 0 or len(samples) >= world_size,
            f"the {split} split has {len(samples)} sample(s), fewer than the {world_size} DDP ranks: "
            "every rank needs at least one batch (use fewer devices, or more data / a larger val_fraction)",
        )
        train = split == "train"
        k = self.voxels_per_sample if train else None
        plan = BatchPlan(
            samples.subject,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            bucket_by_subject=k is None,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            even_shards=train,
            n_external=self._n_external(len(samples)) if train else 0,  # val/test: real samples only
        )
        dataset = BatchDataset(
            self.store,
            samples,
            self.voxel_offsets,
            voxels_per_sample=k,
            replacement=self.voxel_replacement,
            image_sizes=self.image_sizes,
            features=self.features,
            external=self.external if train else None,
            external_rows="index" if self.external_mode == "concat" else "draw",
        )
        return DataLoader(
            dataset,
            sampler=plan,
            batch_size=None,  # items are whole batches (see datasets.py)
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _rank_world(self) -> dict[str, Any]:
        if self.trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def train_dataloader(self) -> DataLoader:
        return self.make_dataloader("train", **self._rank_world())

    def val_dataloader(self) -> DataLoader:
        return self.make_dataloader("val", **self._rank_world())

    def test_dataloader(self) -> DataLoader:
        return self.make_dataloader("test", **self._rank_world())

    def predict_dataloader(self) -> DataLoader:
        return self.make_dataloader("test", **self._rank_world())
