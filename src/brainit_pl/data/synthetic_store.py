"""The synthetic-fMRI store: external images and the encoder's predicted betas, as ``synthesize-fmri`` writes them.

Layout (format v1) of the folder ``OUT`` (default ``STORE/synthetic``)::

    OUT/images.h5          the store's image format (``brainit_pl.data.store``): ``nsd_id`` (N,) = the
                           external ids 0 .. N-1 (their own id space, not NSD's 73k ids), ``images_224``,
                           ``images_112`` (N, 3, S, S) uint8; attrs ``source = "external"``,
                           ``image_source`` (what made them, e.g. ``simulated seed=0 size=64 n=100``) and
                           ``leakage_checked`` (digest of the shared test images they were checked against)
    OUT/fmri_subjNN.h5     one per subject
        betas              (N, V_s) float16 predicted betas in the store's voxel order, one chunk per image
        image_id           (N,) int32, row r of ``betas`` is image ``image_id[r]`` of images.h5 (= r)
        done               (N,) bool, row r is written (flushed per batch; all true when finished)
        attrs: format, format_version, subject, n_voxels, checkpoint (its path as given), checkpoint_sha1
               (sha1 of the checkpoint file's bytes: the weights, not where they lie), image_fingerprint
               (:func:`~brainit_pl.data.cache.image_fingerprint` of images.h5), brainit_pl_version

While written, a subject's file is ``fmri_subjNN.h5.partial``; it is renamed when every row is done.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainit_pl import __version__
from brainit_pl.data.cache import image_fingerprint
from brainit_pl.data.store import IMAGE_SIZES, ImageStore, LazyH5, finite_rows, read_rows
from brainit_pl.data.store_writer import resize_for_store
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path

FORMAT_NAME = "brainit-pl-synthetic-fmri"
FORMAT_VERSION = 1
IMAGES_FILE = "images.h5"
# attrs a finished or partial file must share with the run that reuses or resumes it
IDENTITY_ATTRS = ("subject", "n_voxels", "checkpoint_sha1", "image_fingerprint")


def fmri_path(out: str | os.PathLike, subject: int) -> Path:
    """Where subject ``subject``'s synthetic betas live in the folder ``out``."""
    return Path(out) / f"fmri_subj{subject:02d}.h5"


def file_sha1(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """sha1 of a file's bytes, read in 16 MB blocks (an encoder checkpoint is tens of MB)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def image_hashes(images: np.ndarray) -> list[bytes]:
    """One sha1 per image of (n, ...) uint8 pixels (exact-copy detection, shape included)."""
    return [
        hashlib.sha1(f"{img.shape}".encode() + np.ascontiguousarray(img).tobytes()).digest() for img in images
    ]


def create_fmri_file(path: str | os.PathLike, n_images: int, n_voxels: int, attrs: Mapping[str, Any]) -> None:
    """Write an empty synthetic-betas file (every ``done`` false) at ``path``, atomically.

    Args:
        n_images: N rows (the external images, in images.h5 order).
        n_voxels: V_s columns (the subject's voxels, in the store's order).
        attrs: the :data:`IDENTITY_ATTRS` and ``checkpoint``.
    """
    missing = [k for k in IDENTITY_ATTRS if k not in attrs]
    require(not missing, f"synthetic fMRI attrs lack {missing}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(
            {
                **attrs,
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "brainit_pl_version": __version__,
            }
        )
        h5.create_dataset("betas", shape=(n_images, n_voxels), dtype=np.float16, chunks=(1, n_voxels))
        h5.create_dataset("image_id", data=np.arange(n_images, dtype=np.int32))
        h5.create_dataset("done", data=np.zeros(n_images, dtype=bool))


def check_fmri_file(path: Path, identity: Mapping[str, Any], *, finished: bool, fix: str) -> None:
    """Check that the synthetic-betas file ``path`` was made for ``identity``; else one line saying ``fix``.

    Raises:
        BrainITError: unreadable, another format, another subject, checkpoint or image set, or (with
            ``finished``) rows not done.
    """
    what = "a finished file" if finished else "an interrupted run"
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
            done = h5["done"][()]
    except (OSError, KeyError) as err:
        raise BrainITError(f"{path} ({what}) is not a readable synthetic-fMRI file ({err}); {fix}") from err
    require(
        attrs.get("format") == FORMAT_NAME and int(attrs.get("format_version", -1)) == FORMAT_VERSION,
        f"{path} is not a synthetic-fMRI file of format version {FORMAT_VERSION}; {fix}",
    )
    for key in IDENTITY_ATTRS:
        require(
            str(attrs.get(key)) == str(identity[key]),
            f"{path} ({what}) was made with {key} {str(attrs.get(key))[:16]!r}, this run has "
            f"{str(identity[key])[:16]!r}; {fix}",
        )
    require(not finished or bool(done.all()), f"{path} is not finished; {fix}")


class SyntheticFMRI:
    """Reads a finished synthetic-fMRI folder: the external images and every subject's predicted betas.

    Args:
        out: the folder ``synthesize-fmri`` wrote (holding ``images.h5`` and ``fmri_subjNN.h5``).

    Attributes:
        subjects: the subjects with a finished file, sorted.
        n_images: N, the external images (rows of every subject's betas).
        n_voxels: subject → V_s.

    Raises:
        BrainITError: no images or no finished subject file, or a file made from other images.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out)
        fix = f"run `brainit-pl synthesize-fmri ... --out {self.root}`"
        require(
            (self.root / IMAGES_FILE).is_file(),
            f"no synthetic-fMRI images at {self.root / IMAGES_FILE}; {fix}",
        )
        self.image_store = ImageStore(self.root / IMAGES_FILE)
        self.n_images = len(self.image_store.nsd_ids)
        fingerprint = image_fingerprint(self.image_store)
        self._files: dict[int, LazyH5] = {}
        self.n_voxels: dict[int, int] = {}
        for path in sorted(self.root.glob("fmri_subj[0-9][0-9].h5")):
            subject = int(path.stem.removeprefix("fmri_subj"))
            with h5py.File(path, "r") as h5:
                attrs, n_voxels = dict(h5.attrs), int(h5["betas"].shape[1])
            identity = {k: attrs.get(k) for k in IDENTITY_ATTRS}
            identity.update(subject=subject, n_voxels=n_voxels, image_fingerprint=fingerprint)
            check_fmri_file(path, identity, finished=True, fix=fix)
            self._files[subject], self.n_voxels[subject] = LazyH5(path), n_voxels
        require(bool(self._files), f"no finished fmri_subjNN.h5 in {self.root}; {fix}")
        self.subjects = sorted(self._files)

    def close(self) -> None:
        """Close the open HDF5 handles (they re-open on the next read)."""
        for lazy in (*self._files.values(), self.image_store._h5):
            if lazy._file is not None:
                lazy._file.close()
                lazy._file = None

    def betas(self, subject: int, rows: np.ndarray | list[int]) -> np.ndarray:
        """Predicted betas of image ``rows`` for ``subject`` → (n, V_s) float32, in the order given."""
        require(
            subject in self._files,
            f"subject {subject} has no synthetic fMRI in {self.root} ({self.subjects})",
        )
        rows = np.asarray(rows, dtype=np.int64)
        require(
            rows.size == 0 or (rows.min() >= 0 and rows.max() < self.n_images),
            f"image rows must lie in 0..{self.n_images - 1}",
        )
        lazy = self._files[subject]
        block = read_rows(lazy.file["betas"], rows)
        finite_rows(block, rows, lazy.path, subject, "re-run `brainit-pl synthesize-fmri --overwrite`")
        return block.astype(np.float32)

    def images(self, rows: np.ndarray | list[int], size: int = 224) -> np.ndarray:
        """External images of ``rows`` → (n, 3, size, size) uint8 (a size ``images.h5`` holds)."""
        self.image_store.check_size(size)
        return self.image_store.images(self.image_store.nsd_ids[np.asarray(rows, dtype=np.int64)], size=size)


# ------------------------------------------------------------------------------------- external images
ImageSource = Any  # callable: sorted external ids (n,) -> {size: (n, 3, size, size) uint8} (store_sizes)


def simulated_source(seed: int, size: int) -> ImageSource:
    """External images of the simulator (``EXTERNAL_STREAM``: never the NSD tree's), resized like the tree's.

    Image ``i`` is image ``i`` of :func:`~brainit_pl.data.sim.stimuli.make_external_images` with this
    seed and side ``size``, resized to the store's sizes with PIL bicubic from uint8 exactly as
    ``prepare`` resizes the tree's stimuli, so a copy of a tree image would hash alike.
    """

    from brainit_pl.data.sim.stimuli import EXTERNAL_STREAM, generate_stimuli

    def images(ids: np.ndarray) -> dict[int, np.ndarray]:
        # generate_stimuli makes any slice of a stream on its own, so blocks need not start at 0
        raw = generate_stimuli(
            np.asarray(ids),
            seed=seed,
            size=size,
            feature_size=min(32, size - size % 2),
            stream=EXTERNAL_STREAM,
        ).images  # (n, S, S, 3) uint8
        return resize_for_store(raw)

    return images


def hdf5_source(path: Path) -> tuple[int, np.ndarray | None, ImageSource]:
    """An external image set in MindEye2's format: dataset ``images`` (N, 3, S, S), float in [0, 1] or uint8.

    S = 224 is MindEye2's release; a larger S (e.g. the authors' 256² COCO copies) also gives the 256² copy
    stage 2 reads (:func:`~brainit_pl.data.store_writer.store_sizes`).

    An optional dataset ``nsd_ids`` (N,) int gives, for images that are NSD stimuli, their 0-based 73k id
    (-1 for the others), so copies of the shared test images are refused by id as well as by pixels.

    Returns:
        N, the ``nsd_ids`` (or None), and the image source (224² images go through MindEye2's
        ``images_from_float``: 224² = round(x · 255), 112² bicubic from the float values; larger ones are
        rounded to uint8 and resized as ``prepare`` resizes the NSD stimuli).
    """
    from brainit_pl.data.mindeye2 import images_from_float

    require(path.is_file(), f"--images-hdf5 {path} not found")
    try:
        with h5py.File(path, "r") as h5:
            require("images" in h5, f"{path} has no dataset 'images' (expected (N, 3, S, S), S >= 224)")
            shape, dtype = h5["images"].shape, h5["images"].dtype
            ids = h5["nsd_ids"][()].astype(np.int64) if "nsd_ids" in h5 else None
    except OSError as err:
        raise BrainITError(f"--images-hdf5 {path} is not a readable HDF5 file ({err})") from err
    require(
        len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] >= 224 and shape[0] > 0,
        f"{path}: dataset 'images' has shape {shape}, expected (N, 3, S, S) with S >= 224 (MindEye2's: 224)",
    )
    require(
        dtype == np.uint8 or np.issubdtype(dtype, np.floating),
        f"{path}: dataset 'images' has dtype {dtype}, expected uint8 or float in [0, 1]",
    )
    require(ids is None or ids.shape == (shape[0],), f"{path}: 'nsd_ids' must have shape ({shape[0]},)")

    def images(rows: np.ndarray) -> dict[int, np.ndarray]:
        with h5py.File(path, "r") as h5:
            x = h5["images"][np.asarray(rows, dtype=np.int64)]  # rows increasing: one hyperslab read
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0  # exact: images_from_float rounds back to the same bytes
        require(bool(np.isfinite(x).all()), f"{path}: images {rows[0]}..{rows[-1]} contain NaN or inf")
        if x.shape[-1] == 224:
            return images_from_float(x)
        return resize_for_store(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1))

    return int(shape[0]), ids, images


class SharedImages:
    """The store's shared (test) images, as the leakage check needs them: ids and per-image pixel hashes.

    Args:
        store: a :class:`~brainit_pl.data.store.Store`.

    Attributes:
        nsd_ids: (S,) sorted 0-based 73k ids flagged ``trials/shared`` in any subject's file.
        digest: sha1 over the ids and hashes (recorded in images.h5 as ``leakage_checked``).
    """

    def __init__(self, store: Any, batch: int = 64) -> None:
        ids = [store.subject(s).trials["nsd_id"][store.subject(s).trials["shared"]] for s in store.subjects]
        self.nsd_ids = np.unique(np.concatenate(ids)).astype(np.int64)
        self._by_hash: dict[bytes, int] = {}
        images = store.images
        for a in range(0, len(self.nsd_ids), batch):
            block = self.nsd_ids[a : a + batch]
            for s in IMAGE_SIZES:
                for h, i in zip(image_hashes(images.images(block, size=s)), block.tolist(), strict=True):
                    self._by_hash[h] = i
        digest = hashlib.sha1(self.nsd_ids.astype("<i8").tobytes())
        for h in sorted(self._by_hash):
            digest.update(h)
        self.digest = digest.hexdigest()

    def check_ids(self, nsd_ids: np.ndarray | None, where: str) -> None:
        """Refuse any external image whose declared 73k id is a shared (test) image."""
        if nsd_ids is None:
            return
        leaked = np.flatnonzero(np.isin(nsd_ids, self.nsd_ids))
        if len(leaked):
            first = int(leaked[0])
            raise BrainITError(
                f"{where}: image {first} is shared (test) NSD image {int(nsd_ids[first])} ({len(leaked)} such "
                "images); test images never enter synthetic data: remove them from the set"
            )

    def check_pixels(self, ext_ids: np.ndarray, block: Mapping[int, np.ndarray], where: str) -> None:
        """Refuse any external image whose pixels (224² or 112²) equal a shared (test) image's."""
        for s in IMAGE_SIZES:
            for h, i in zip(image_hashes(block[s]), ext_ids.tolist(), strict=True):
                require(
                    h not in self._by_hash,
                    f"{where}: image {i} is a pixel copy of shared (test) NSD image {self._by_hash.get(h)} "
                    f"({s}²); test images never enter synthetic data: remove it from the set",
                )
