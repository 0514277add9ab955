"""The feature cache: per-image backbone tokens of a store's images, written by ``brainit-pl extract-features``.

Layout (format v1), next to the image store it was computed from::

    STORE/features_clip.h5
        tokens     (N, T, D) float16 patch tokens (CLIP: T = 256, D = 1664 for ViT-bigG-14), one HDF5
                   chunk per image, so a batch costs one chunk read per image (no whole-cache loads)
        nsd_id     (N,) int32, equal to the image store's ``nsd_id`` (row r of both files is one image)
        done       (N,) bool, row r's tokens are written (flushed after every batch; what a resumed
                   extraction skips). All true in a finished cache.
        attrs: format, format_version, backbone ("clip"), arch ("ViT-bigG-14" / "tiny"), weights (the
               weights' file or folder name, or "random (seed 0)" for the tiny twin), width D, n_tokens T,
               image_fingerprint (see :func:`image_fingerprint`), brainit_pl_version

While being extracted the file is ``STORE/features_clip.h5.partial``; it is renamed to its final name only
when every row is done, so a reader never sees a half-written cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainit_pl import __version__
from brainit_pl.data.store import ImageStore, LazyH5, read_rows
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path

log = logging.getLogger(__name__)

FORMAT_NAME = "brainit-pl-features"
FORMAT_VERSION = 1
BACKBONES = ("clip",)
FINGERPRINT_SAMPLES = 16
# attrs a cache must share with the run that reads or resumes it (besides the image fingerprint)
IDENTITY_ATTRS = ("backbone", "arch", "weights")


def cache_path(store: str | os.PathLike, backbone: str = "clip") -> Path:
    """Where the ``backbone`` feature cache of the store folder ``store`` lives."""
    require(
        backbone in BACKBONES, f"unknown feature backbone {backbone!r}; expected one of {list(BACKBONES)}"
    )
    return Path(store) / f"features_{backbone}.h5"


def partial_path(path: str | os.PathLike) -> Path:
    """The in-progress name of the cache ``path`` (renamed to ``path`` when complete)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def discard_unreadable(partial: Path) -> bool:
    """Delete the in-progress file ``partial`` if HDF5 cannot open it (a run stopped by a full disk leaves it
    truncated), so that re-running the same command starts it over instead of failing on it.

    Returns:
        True if ``partial`` exists (and is readable) afterwards.
    """
    if not partial.exists():
        return False
    try:
        with h5py.File(partial, "r"):
            return True
    except OSError as err:
        log.warning("%s was left unreadable by a failed run (%s); starting it over", partial, err)
        partial.unlink()
        return False


def extract_command(path: Path, backbone: str = "clip") -> str:
    """The command that (re)builds the cache at ``path`` (for error messages)."""
    return f"brainit-pl extract-features --store {path.parent} --backbone {backbone}"


def image_fingerprint(images: ImageStore) -> str:
    """A short hash identifying an image store's content, cheap enough to check at every open.

    sha1 over: the nsd_id array (int64 bytes; so the size and order of the images), and the 224² pixels of
    :data:`FINGERPRINT_SAMPLES` rows evenly spaced from the first to the last (with their shape). Hashing
    every image would read the whole store (1.9 GB per subject) each time a DataModule opens; the sample
    catches another store, a re-prepared store with other images, and a wholesale change of the pixels,
    but not an edit of an unsampled image.

    Returns:
        The hex digest (40 characters).
    """
    ids = np.asarray(images.nsd_ids, dtype=np.int64)
    rows = np.unique(
        np.linspace(0, len(ids) - 1, min(len(ids), FINGERPRINT_SAMPLES)).round().astype(np.int64)
    )
    sample = images.images(ids[rows], size=224)  # (n, 3, 224, 224) uint8
    digest = hashlib.sha1(b"brainit-pl image fingerprint v1\0")
    digest.update(ids.astype("<i8").tobytes())
    digest.update(f"{sample.shape}".encode())
    digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()


def create_cache_file(
    path: str | os.PathLike, nsd_ids: np.ndarray, *, n_tokens: int, width: int, attrs: Mapping[str, Any]
) -> None:
    """Write an empty cache (every ``done`` false) at ``path``, atomically.

    Args:
        nsd_ids: (N,) the image store's ids, in its order.
        n_tokens, width: T and D of ``tokens`` (N, T, D).
        attrs: ``backbone``, ``arch``, ``weights`` and ``image_fingerprint``.
    """
    missing = [k for k in (*IDENTITY_ATTRS, "image_fingerprint") if k not in attrs]
    require(not missing, f"feature cache attrs lack {missing}")
    n = len(nsd_ids)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(
            {
                **attrs,
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "brainit_pl_version": __version__,
                "n_tokens": int(n_tokens),
                "width": int(width),
            }
        )
        h5.create_dataset("nsd_id", data=np.asarray(nsd_ids, dtype=np.int32))
        h5.create_dataset("tokens", shape=(n, n_tokens, width), dtype=np.float16, chunks=(1, n_tokens, width))
        h5.create_dataset("done", data=np.zeros(n, dtype=bool))


def check_cache_file(
    h5: h5py.File, path: Path, images: ImageStore, fingerprint: str, *, fix: str
) -> dict[str, Any]:
    """Check that the open cache ``h5`` (at ``path``) belongs to ``images``; return its attrs.

    Args:
        fingerprint: ``image_fingerprint(images)`` (passed in: the caller may need it twice).
        fix: the end of each error message: how to rebuild the cache.

    Raises:
        BrainITError: another format or version, or computed for another image store (size or fingerprint),
            naming the stored and the current value.
    """
    attrs = dict(h5.attrs)
    require(
        attrs.get("format") == FORMAT_NAME and int(attrs.get("format_version", -1)) == FORMAT_VERSION,
        f"{path} is not a brainit-pl feature cache of format version {FORMAT_VERSION} "
        f"(format {attrs.get('format')!r}, version {attrs.get('format_version')}); {fix}",
    )
    stored_ids = h5["nsd_id"][()]
    require(
        len(stored_ids) == len(images.nsd_ids),
        f"{path} holds features of {len(stored_ids)} images but the image store {images.path} has "
        f"{len(images.nsd_ids)}; {fix}",
    )
    stored = str(attrs.get("image_fingerprint", ""))
    require(
        stored == fingerprint and np.array_equal(stored_ids, images.nsd_ids),
        f"{path} was computed from other images: image fingerprint {stored[:12]} (stored) != {fingerprint[:12]} "
        f"(the image store {images.path} now); {fix}",
    )
    return attrs


class FeatureCache:
    """Reads one finished feature cache, row by row, for the images of ``image_store``.

    Opened lazily (and re-opened in a forked DataLoader worker), like the store's own files; only the
    ``nsd_id`` table is read at open.

    Args:
        path: the cache file, e.g. ``cache_path(store_root, "clip")``.
        image_store: the image store it must have been computed from (checked by size, ids and
            :func:`image_fingerprint`).

    Attributes:
        backbone, arch, weights: what computed it (``"clip"``, ``"ViT-bigG-14"``, the weights' name).
        n_tokens, width: T and D of each image's (T, D) tokens.

    Raises:
        BrainITError: no cache (saying which command makes it, and whether an interrupted one can be
            resumed), an unreadable or unfinished file, or a cache of another image store.
    """

    def __init__(self, path: str | os.PathLike, image_store: ImageStore) -> None:
        self.path = Path(path)
        backbone = self.path.stem.removeprefix("features_")
        command = extract_command(self.path, backbone)
        if not self.path.is_file():
            hint = (
                f"an interrupted extraction left {partial_path(self.path).name}: run `{command}` to finish it"
                if partial_path(self.path).is_file()
                else f"run `{command}` first"
            )
            raise BrainITError(f"no {backbone} feature cache at {self.path}; {hint}")
        fix = f"re-run `{command} --overwrite`"
        try:
            with h5py.File(self.path, "r") as h5:
                attrs = check_cache_file(h5, self.path, image_store, image_fingerprint(image_store), fix=fix)
                require(bool(h5["done"][()].all()), f"{self.path} is not finished; {fix}")
                shape = h5["tokens"].shape
        except (OSError, KeyError) as err:
            raise BrainITError(f"{self.path} is not a readable feature cache ({err}); {fix}") from err
        self.backbone = str(attrs["backbone"])
        self.arch = str(attrs["arch"])
        self.weights = str(attrs["weights"])
        self.n_tokens, self.width = int(shape[1]), int(shape[2])
        self._row = {int(i): r for r, i in enumerate(image_store.nsd_ids)}
        self._h5 = LazyH5(self.path)

    def __len__(self) -> int:
        return len(self._row)

    def tokens(self, nsd_ids: np.ndarray | list[int]) -> np.ndarray:
        """Tokens of the images ``nsd_ids`` (0-based 73k ids) → (n, T, D) float16, in the order given.

        Duplicates are read once. Raises BrainITError for an id that is not in the image store.
        """
        try:
            rows = np.asarray([self._row[int(i)] for i in nsd_ids], dtype=np.int64)
        except KeyError as err:
            raise BrainITError(
                f"image {err.args[0]} (73k id) is not in the feature cache {self.path}"
            ) from err
        return read_rows(self._h5.file["tokens"], rows)
