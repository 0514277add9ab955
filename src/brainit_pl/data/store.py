"""brainit-pl's streaming store: what ``brainit-pl prepare`` writes and the NSDDataModule reads.

Layout of a store folder::

    STORE/manifest.json      format version, subjects (file, voxel and trial counts), images, source
    STORE/subjNN.h5          one per subject
        betas                (T, V) float16, z-scored per session per voxel; chunks of one row, so a
                             random trial costs one chunk read (no whole-dataset loads)
        trials/nsd_id        (T,) int32   0-based 73k image id of each trial
        trials/session       (T,) int16   1-based session
        trials/trial         (T,) int16   0-based trial within its session
        trials/global_trial  (T,) int32   (session - 1) * trials_per_session + trial
        trials/shared        (T,) bool    image is in the shared (test) set
        trials/repeat        (T,) int8    0, 1, 2: which presentation of that image this trial is
        voxels/ijk           (V, 3) int32 voxel indices in the subject's volume (fsaverage: vertex ids
                                          in column 0, hemisphere 0/1 in column 1, -1 in column 2)
        voxels/xyz           (V, 3) float32 coordinates in mm (scanner/world space)
        ncsnr                (V,) float32 optional: noise-ceiling SNR of each voxel
        attrs: format_version, subject, space, trials_per_session, source
    STORE/images.h5
        nsd_id               (N,) int32 sorted 0-based 73k ids
        images_224           (N, 3, 224, 224) uint8, one chunk per image
        images_112           (N, 3, 112, 112) uint8 (anti-aliased downsampling)
        images_256           (N, 3, 256, 256) uint8, only when the source images are at least 256² (the
                             425² NSD stimuli of ``prepare --nsd-root``): stage 2's native VAE input

The writers are in :mod:`brainit_pl.data.store_writer`. Every file is written under a temporary name and renamed into place when complete, so a reader never
sees a half-written store. Readers open HDF5 files lazily and re-open them in a forked worker process
(an h5py handle must not cross a fork).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainit_pl.errors import BrainITError, require

FORMAT_NAME = "brainit-pl-store"
FORMAT_VERSION = 1
IMAGE_SIZES = (224, 112)  # in every image store
NATIVE_SIZES = (256,)  # stored when the source images are at least this large (never upsampled)
ALL_IMAGE_SIZES = IMAGE_SIZES + NATIVE_SIZES
TRIAL_FIELDS: dict[str, Any] = {
    "nsd_id": np.int32,
    "session": np.int16,
    "trial": np.int16,
    "global_trial": np.int32,
    "shared": np.bool_,
    "repeat": np.int8,
}


def subject_filename(subject: int) -> str:
    return f"subj{subject:02d}.h5"


def repeat_index(nsd_ids: np.ndarray) -> np.ndarray:
    """For trials in presentation order, which presentation (0, 1, 2, ...) of its image each one is."""
    nsd_ids = np.asarray(nsd_ids)
    out = np.zeros(len(nsd_ids), dtype=np.int8)
    seen: dict[int, int] = {}
    for i, img in enumerate(nsd_ids.tolist()):
        out[i] = seen.get(img, 0)
        seen[img] = out[i] + 1
    return out


# --------------------------------------------------------------------------------------------- reading
class LazyH5:
    """An h5py file opened on first use and re-opened after a fork (worker processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: h5py.File | None = None
        self._pid = -1

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = open_h5(self.path)
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        return {"path": self.path, "_file": None, "_pid": -1}


DAMAGED = "the file is damaged or truncated: re-create it with the command that wrote it"


def open_h5(path: str | os.PathLike, fix: str = DAMAGED) -> h5py.File:
    """``h5py.File(path, "r")``; a file HDF5 cannot open (truncated, not HDF5) is one line saying ``fix``."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise BrainITError(f"{path} is not a readable HDF5 file ({err}); {fix}") from err


def read_rows(dset: h5py.Dataset, rows: np.ndarray | list[int]) -> np.ndarray:
    """``dset[rows]`` for rows in any order, duplicates allowed; each distinct row is read once.

    Why not ``dset[rows]``: h5py needs sorted unique indices, and turns a list index into a union of
    hyperslab selections, which costs ~0.4 ms per row (36 ms for the 96 rows of a batch of 32 images x 3
    repeats at 15.7k voxels), about 30x more than reading the rows one by one.
    """
    uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    out = np.empty((len(uniq), *dset.shape[1:]), dtype=dset.dtype)
    for j, r in enumerate(uniq.tolist()):
        try:
            out[j] = dset[r]
        except OSError as err:
            raise BrainITError(
                f"{dset.file.filename}: row {r} of {dset.name} unreadable ({err}); {DAMAGED}"
            ) from err
    return out[inverse]


def finite_rows(
    block: np.ndarray, rows: np.ndarray | list[int], path: Path, subject: int, fix: str
) -> np.ndarray:
    """``block`` (the betas of ``rows``) if every value is finite; else one line naming the file, subject and
    first bad row (NaN/inf betas would otherwise train a NaN model without a word). Costs one pass per batch."""
    finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
    if not finite.all():
        row = int(np.asarray(rows)[np.argmin(finite)])
        raise BrainITError(f"{path}: subject {subject}, row {row} of betas holds NaN or inf values; {fix}")
    return block


def _check_version(attrs: Mapping[str, Any], what: str) -> None:
    found = int(attrs.get("format_version", -1))
    require(
        found == FORMAT_VERSION,
        f"{what} was written by an incompatible brainit-pl store format (version {found}, this version reads "
        f"{FORMAT_VERSION}); re-run `brainit-pl prepare`",
    )


@dataclass
class SubjectStore:
    """One subject's betas, trial table and voxel geometry. Small tables are read into RAM at open;
    betas stay on disk and are read by row."""

    path: Path
    subject: int = field(init=False)
    space: str = field(init=False)
    trials_per_session: int = field(init=False)
    n_trials: int = field(init=False)
    n_voxels: int = field(init=False)
    trials: dict[str, np.ndarray] = field(init=False)
    xyz: np.ndarray = field(init=False)
    ijk: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        require(self.path.is_file(), f"store file {self.path} not found")
        fix = "re-run `brainit-pl prepare` (the file is damaged or truncated)"
        try:
            with open_h5(self.path, fix) as h5:
                _check_version(h5.attrs, str(self.path))
                self.subject = int(h5.attrs["subject"])
                self.space = str(h5.attrs["space"])
                self.trials_per_session = int(h5.attrs["trials_per_session"])
                self.n_trials, self.n_voxels = h5["betas"].shape
                self.trials = {k: h5[f"trials/{k}"][()] for k in TRIAL_FIELDS}
                self.xyz = h5["voxels/xyz"][()]
                self.ijk = h5["voxels/ijk"][()]
                self.ncsnr = h5["ncsnr"][()] if "ncsnr" in h5 else None
                # Volume geometry (volumetric stores only; None for fsaverage / MindEye2 stores).
                self.affine = h5["voxels/affine"][()] if "voxels/affine" in h5 else None
                shape = h5["voxels/volume_shape"][()] if "voxels/volume_shape" in h5 else None
                self.volume_shape = None if shape is None else tuple(int(n) for n in shape)
        except (OSError, KeyError) as err:
            raise BrainITError(f"{self.path} is not a readable brainit-pl store file ({err}); {fix}") from err
        self._h5 = LazyH5(self.path)

    def betas(self, rows: np.ndarray | list[int], dtype: Any = np.float32) -> np.ndarray:
        """Betas of trial ``rows`` → (len(rows), V), in the order given (duplicates allowed).

        ``dtype=None`` keeps the stored float16 (callers that convert in torch save a slow numpy cast).
        """
        block = read_rows(self._h5.file["betas"], rows)  # (len(rows), V) float16
        finite_rows(block, rows, self.path, self.subject, "the store is damaged: re-run `brainit-pl prepare`")
        return block if dtype is None else block.astype(dtype)


@dataclass
class ImageStore:
    """The stimulus images at 224² and 112² (and 256² when stored; uint8, channels first), by 73k id."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        require(self.path.is_file(), f"image store {self.path} not found")
        fix = "re-create it (`brainit-pl prepare`, or `synthesize-fmri` for external images)"
        try:
            with open_h5(self.path, fix) as h5:
                _check_version(h5.attrs, str(self.path))
                self.nsd_ids = h5["nsd_id"][()].astype(np.int64)
                self.sizes = tuple(s for s in ALL_IMAGE_SIZES if f"images_{s}" in h5)
        except (OSError, KeyError) as err:
            raise BrainITError(f"{self.path} is not a readable image store ({err}); {fix}") from err
        self._row = {int(i): r for r, i in enumerate(self.nsd_ids)}
        self._h5 = LazyH5(self.path)

    def __contains__(self, nsd_id: int) -> bool:
        return int(nsd_id) in self._row

    def rows(self, nsd_ids: np.ndarray | list[int]) -> np.ndarray:
        try:
            return np.asarray([self._row[int(i)] for i in nsd_ids], dtype=np.int64)
        except KeyError as err:
            raise BrainITError(f"image {err.args[0]} (73k id) is not in the image store {self.path}") from err

    def images(self, nsd_ids: np.ndarray | list[int], size: int = 224) -> np.ndarray:
        """Images of ``nsd_ids`` → (n, 3, size, size) uint8, in the order given."""
        self.check_size(size)
        return read_rows(self._h5.file[f"images_{size}"], self.rows(nsd_ids))

    def check_size(self, size: int) -> None:
        """Refuse, with the fix named, a size this file does not hold."""
        native = (
            f" (the {size}² copy is written only from source images of at least {size}²: "
            "`brainit-pl prepare --nsd-root` from the 425² NSD stimuli)"
            if size in NATIVE_SIZES
            else ""
        )
        require(
            size in self.sizes, f"image size {size} not in {self.path}; it holds {list(self.sizes)}{native}"
        )


@dataclass
class Store:
    """A prepared store folder: its manifest, one :class:`SubjectStore` per subject, the image store."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        manifest_path = self.root / "manifest.json"
        require(
            manifest_path.is_file(),
            f"{self.root} is not a brainit-pl store (no manifest.json); create one with `brainit-pl prepare`",
        )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise BrainITError(f"{manifest_path} is not valid JSON ({err})") from err
        require(
            self.manifest.get("format") == FORMAT_NAME, f"{manifest_path} is not a brainit-pl store manifest"
        )
        _check_version(self.manifest, str(manifest_path))
        self._subjects: dict[int, SubjectStore] = {}

    @property
    def subjects(self) -> list[int]:
        return sorted(int(s) for s in self.manifest["subjects"])

    def subject(self, subject: int) -> SubjectStore:
        if subject not in self._subjects:
            require(
                subject in self.subjects,
                f"subject {subject} is not in the store {self.root} (it has subjects {self.subjects})",
            )
            self._subjects[subject] = SubjectStore(
                self.root / self.manifest["subjects"][str(subject)]["file"]
            )
        return self._subjects[subject]

    @property
    def images(self) -> ImageStore:
        require(self.manifest.get("images") is not None, f"the store {self.root} has no image store")
        if not hasattr(self, "_images"):
            self._images = ImageStore(self.root / self.manifest["images"]["file"])
        return self._images
