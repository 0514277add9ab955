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

Every file is written under a temporary name and renamed into place when complete, so a reader never
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

from brainit_pl import __version__
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path, atomic_write_text

FORMAT_NAME = "brainit-pl-store"
FORMAT_VERSION = 1
IMAGE_SIZES = (224, 112)
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


# --------------------------------------------------------------------------------------------- writing
class SubjectStoreWriter:
    """Write one subject's HDF5 file row block by row block (one session at a time fits in RAM).

    Use as a context manager; the file appears under its final name only if the block succeeds::

        with SubjectStoreWriter(path, subject=1, n_trials=T, n_voxels=V, space="func1pt8mm") as w:
            for start, block in sessions:
                w.write_betas(start, block)
            w.write_trials(trials)
            w.write_voxels(ijk, xyz)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        subject: int,
        n_trials: int,
        n_voxels: int,
        space: str,
        trials_per_session: int,
        source: str = "",
    ) -> None:
        require(n_trials > 0, f"subject {subject}: no trials to write")
        require(n_voxels > 0, f"subject {subject}: no voxels to write")
        self.path = Path(path)
        self.subject, self.n_trials, self.n_voxels = subject, n_trials, n_voxels
        self._attrs = {
            "format_version": FORMAT_VERSION,
            "brainit_pl_version": __version__,
            "subject": subject,
            "space": space,
            "trials_per_session": trials_per_session,
            "source": source,
        }
        self._written = np.zeros(n_trials, dtype=bool)
        self._parts: set[str] = set()

    def __enter__(self) -> SubjectStoreWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._h5 = h5py.File(tmp, "w")
        self._h5.attrs.update(self._attrs)
        self._betas = self._h5.create_dataset(
            "betas", shape=(self.n_trials, self.n_voxels), dtype=np.float16, chunks=(1, self.n_voxels)
        )
        return self

    def write_betas(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (n, V) into trials ``start .. start + n``; values must be finite."""
        rows = np.asarray(rows)
        require(
            rows.ndim == 2 and rows.shape[1] == self.n_voxels,
            f"betas block {rows.shape} != (n, {self.n_voxels})",
        )
        require(bool(np.isfinite(rows).all()), f"subject {self.subject}: betas contain NaN or inf")
        self._betas[start : start + len(rows)] = rows.astype(np.float16)
        self._written[start : start + len(rows)] = True

    def write_trials(self, trials: Mapping[str, np.ndarray]) -> None:
        """Write the trial table (the fields of ``TRIAL_FIELDS``, each of length T)."""
        group = self._h5.create_group("trials")
        for name, dtype in TRIAL_FIELDS.items():
            require(name in trials, f"trial table lacks field {name!r}")
            values = np.asarray(trials[name]).astype(dtype)
            require(
                values.shape == (self.n_trials,),
                f"trials/{name} has shape {values.shape}, expected ({self.n_trials},)",
            )
            group.create_dataset(name, data=values)
        self._parts.add("trials")

    def write_voxels(
        self,
        ijk: np.ndarray,
        xyz: np.ndarray,
        affine: np.ndarray | None = None,
        volume_shape: tuple[int, ...] | None = None,
    ) -> None:
        """Write voxel indices (V, 3), coordinates in mm (V, 3), and optionally the volume geometry."""
        group = self._h5.create_group("voxels")
        group.create_dataset("ijk", data=np.asarray(ijk, dtype=np.int32).reshape(self.n_voxels, 3))
        group.create_dataset("xyz", data=np.asarray(xyz, dtype=np.float32).reshape(self.n_voxels, 3))
        if affine is not None:
            group.create_dataset("affine", data=np.asarray(affine, dtype=np.float64).reshape(4, 4))
        if volume_shape is not None:
            group.create_dataset("volume_shape", data=np.asarray(volume_shape, dtype=np.int32))
        self._parts.add("voxels")

    def write_ncsnr(self, ncsnr: np.ndarray) -> None:
        self._h5.create_dataset("ncsnr", data=np.asarray(ncsnr, dtype=np.float32).reshape(self.n_voxels))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                missing = {"trials", "voxels"} - self._parts
                require(not missing, f"subject {self.subject}: store file lacks {sorted(missing)}")
                require(
                    bool(self._written.all()),
                    f"subject {self.subject}: {int((~self._written).sum())} trial rows never written",
                )
        except BaseException as err:
            self._h5.close()
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._h5.close()
        self._ctx.__exit__(exc_type, exc, tb)


def resize_for_store(images: np.ndarray) -> dict[int, np.ndarray]:
    """uint8 images (n, H, W, 3) → ``{size: (n, 3, size, size) uint8}`` for every size in IMAGE_SIZES.

    PIL's bicubic resize is anti-aliased when shrinking (its filter support scales with the factor), which
    is what the 224² (CLIP, encoder, metrics) and 112² (VGG) inputs need.
    """
    from PIL import Image

    out = {s: np.empty((len(images), 3, s, s), dtype=np.uint8) for s in IMAGE_SIZES}
    for n, img in enumerate(images):
        pil = Image.fromarray(img)
        for s in IMAGE_SIZES:
            out[s][n] = np.asarray(pil.resize((s, s), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    return out


def write_images(
    path: str | os.PathLike, nsd_ids: np.ndarray, images: Any, *, source: str = "", batch: int = 256
) -> None:
    """Write the image store. ``images(ids) -> (n, 3, S, S) uint8`` gives each size in IMAGE_SIZES.

    Args:
        nsd_ids: 0-based 73k ids to store (written sorted).
        images: callable taking a sorted id array and returning ``{size: (n, 3, size, size) uint8}``.
    """
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    require(len(ids) > 0, "no images to write")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(
            {"format_version": FORMAT_VERSION, "brainit_pl_version": __version__, "source": source}
        )
        h5.create_dataset("nsd_id", data=ids.astype(np.int32))
        dsets = {
            s: h5.create_dataset(
                f"images_{s}", shape=(len(ids), 3, s, s), dtype=np.uint8, chunks=(1, 3, s, s)
            )
            for s in IMAGE_SIZES
        }
        for start in range(0, len(ids), batch):
            block = images(ids[start : start + batch])
            for s, d in dsets.items():
                d[start : start + len(block[s])] = block[s]


def write_manifest(
    root: str | os.PathLike,
    subjects: Mapping[int, Mapping[str, Any]],
    *,
    images: Mapping[str, Any] | None,
    source: Mapping[str, Any],
) -> None:
    """Write ``manifest.json`` last: a store is complete exactly when its manifest exists."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "brainit_pl_version": __version__,
        "source": dict(source),
        "subjects": {str(s): dict(v) for s, v in sorted(subjects.items())},
        "images": dict(images) if images is not None else None,
    }
    atomic_write_text(Path(root) / "manifest.json", json.dumps(manifest, indent=2))


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
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        return {"path": self.path, "_file": None, "_pid": -1}


def read_rows(dset: h5py.Dataset, rows: np.ndarray | list[int]) -> np.ndarray:
    """``dset[rows]`` for rows in any order, duplicates allowed; each distinct row is read once.

    Why not ``dset[rows]``: h5py needs sorted unique indices, and turns a list index into a union of
    hyperslab selections, which costs ~0.4 ms per row (36 ms for the 96 rows of a batch of 32 images x 3
    repeats at 15.7k voxels), about 30x more than reading the rows one by one.
    """
    uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    out = np.empty((len(uniq), *dset.shape[1:]), dtype=dset.dtype)
    for j, r in enumerate(uniq.tolist()):
        out[j] = dset[r]
    return out[inverse]


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
        try:
            with h5py.File(self.path, "r") as h5:
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
            raise BrainITError(f"{self.path} is not a readable brainit-pl store file ({err})") from err
        self._h5 = LazyH5(self.path)

    def betas(self, rows: np.ndarray | list[int], dtype: Any = np.float32) -> np.ndarray:
        """Betas of trial ``rows`` → (len(rows), V), in the order given (duplicates allowed).

        ``dtype=None`` keeps the stored float16 (callers that convert in torch save a slow numpy cast).
        """
        block = read_rows(self._h5.file["betas"], rows)  # (len(rows), V) float16
        return block if dtype is None else block.astype(dtype)


@dataclass
class ImageStore:
    """The stimulus images at 224² and 112² (uint8, channels first), indexed by 73k id."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        require(self.path.is_file(), f"image store {self.path} not found")
        with h5py.File(self.path, "r") as h5:
            _check_version(h5.attrs, str(self.path))
            self.nsd_ids = h5["nsd_id"][()].astype(np.int64)
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
        require(size in IMAGE_SIZES, f"image size {size} not stored; choose one of {IMAGE_SIZES}")
        return read_rows(self._h5.file[f"images_{size}"], self.rows(nsd_ids))


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
