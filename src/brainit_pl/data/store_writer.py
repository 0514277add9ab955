"""Writing brainit-pl's streaming store (its layout: :mod:`brainit_pl.data.store`).

``brainit-pl prepare`` (and the synthetic-fMRI and simulation jobs) write subjects, images and the manifest
through these; each file goes under a temporary name and is renamed into place when complete, and the
manifest comes last, so a store is complete exactly when its ``manifest.json`` exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainit_pl import __version__
from brainit_pl.data.store import (
    ALL_IMAGE_SIZES,
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_SIZES,
    NATIVE_SIZES,
    TRIAL_FIELDS,
)
from brainit_pl.errors import require
from brainit_pl.files import atomic_path, atomic_write_text


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


def store_sizes(height: int, width: int) -> tuple[int, ...]:
    """The sizes stored for source images of ``height`` × ``width``: IMAGE_SIZES, plus each of
    NATIVE_SIZES the source reaches (256² from the 425² NSD stimuli; never an upsampled copy)."""
    return IMAGE_SIZES + tuple(s for s in NATIVE_SIZES if s <= min(height, width))


def resize_for_store(images: np.ndarray) -> dict[int, np.ndarray]:
    """uint8 images (n, H, W, 3) → ``{size: (n, 3, size, size) uint8}`` for every size of :func:`store_sizes`.

    PIL's bicubic resize is anti-aliased when shrinking (its filter support scales with the factor), which
    is what the 224² (CLIP, encoder, metrics), 112² (VGG) and 256² (stage 2's VAE) inputs need.
    """
    from PIL import Image

    sizes = store_sizes(*images.shape[1:3])
    out = {s: np.empty((len(images), 3, s, s), dtype=np.uint8) for s in sizes}
    for n, img in enumerate(images):
        pil = Image.fromarray(img)
        for s in sizes:
            out[s][n] = np.asarray(pil.resize((s, s), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    return out


def write_images(
    path: str | os.PathLike, nsd_ids: np.ndarray, images: Any, *, source: str = "", batch: int = 256
) -> None:
    """Write the image store. ``images(ids) -> {S: (n, 3, S, S) uint8}`` gives each size in IMAGE_SIZES
    and any of NATIVE_SIZES (the same sizes for every block; the first block decides).

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
        dsets: dict[int, h5py.Dataset] = {}
        for start in range(0, len(ids), batch):
            block = images(ids[start : start + batch])
            if not dsets:
                sizes = sorted(block, key=ALL_IMAGE_SIZES.index)
                require(
                    set(IMAGE_SIZES) <= set(sizes) <= set(ALL_IMAGE_SIZES),
                    f"image sizes {sizes}: need {list(IMAGE_SIZES)}, may add {list(NATIVE_SIZES)}",
                )
                dsets = {
                    s: h5.create_dataset(
                        f"images_{s}", shape=(len(ids), 3, s, s), dtype=np.uint8, chunks=(1, 3, s, s)
                    )
                    for s in sizes
                }
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
