"""Find and read the image pairs that ``brainit-pl evaluate`` scores.

Layouts of the reconstruction folder (``--recons``):

* flat: ``RECONS/*.png`` → one subject, ``all``;
* per subject: ``RECONS/subjNN/*.png`` → one row per subject;
* ``brainit-pl reconstruct`` output: ``RECONS/subjNN/<kind>/*.png`` with kind ``lowlevel``, ``semantic`` or
  ``refined``. ``--kind K`` picks ``K``; without it, PNGs lying directly in the subject folder are used,
  else its ``refined`` folder (the final output).

The ground-truth folder (``--gt``) is flat (the shared test images, scored against every subject) or has
the same ``subjNN/`` subfolders. File names must match one to one.

Retrieval needs embeddings: an ``embeddings.npz`` in the image folder or its subject folder, with arrays
``brain`` and ``image`` of shape (N, ...) — one row per PNG, in sorted file-name order, or in the order of an
optional ``names`` array of file names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from brainit_pl.errors import BrainITError
from brainit_pl.metrics.protocols import SUBSET_SIZE

if TYPE_CHECKING:  # torch is imported where it runs: `brainit-pl evaluate --help` stays fast
    from torch import Tensor

SUBJECT_DIR = re.compile(r"^subj\d\d$")
RECON_KINDS: tuple[str, ...] = ("lowlevel", "semantic", "semantic_stock", "refined")
DEFAULT_KIND = "refined"
EMBEDDINGS_FILE = "embeddings.npz"


@dataclass(frozen=True)
class EvalSet:
    """The pairs of one subject: reconstructions and ground truths with the same file names."""

    subject: str
    recon_dir: Path
    gt_dir: Path
    names: tuple[str, ...]  # sorted PNG file names
    embeddings: Path | None = None


@contextlib.contextmanager
def open_image(path: Path) -> Iterator:
    """``PIL.Image.open(path)``; a file that is not an image, or is cut off, is one line naming it (PIL reads the
    header at open and the pixels in the block: both failures are caught)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            yield image
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # SyntaxError: PIL's broken-PNG chunks
        raise BrainITError(
            f"{path} is not a readable image ({err}); replace or delete it (a resumed `brainit-pl reconstruct` "
            "redoes deleted images)"
        ) from err


def read_rgb(path: Path) -> np.ndarray:
    """An image file → (H, W, 3) uint8 RGB (one line naming the file if it is unreadable)."""
    with open_image(path) as image:
        return np.asarray(image.convert("RGB"))


def list_pngs(folder: Path) -> list[str]:
    """Sorted names of the PNG files in ``folder`` (not recursive)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _image_dir(folder: Path, kind: str | None) -> Path:
    """The folder holding the PNGs of one subject (or of a flat layout), per ``--kind``."""
    if kind is not None:
        chosen = folder / kind
        if not chosen.is_dir():
            raise BrainITError(f"--kind {kind}: there is no folder {chosen}")
        return chosen
    if list_pngs(folder):
        return folder
    if (folder / DEFAULT_KIND).is_dir():
        return folder / DEFAULT_KIND
    kinds = [k for k in RECON_KINDS if (folder / k).is_dir()]
    hint = f"; pick one with --kind ({', '.join(kinds)})" if kinds else ""
    raise BrainITError(f"no PNG images in {folder}{hint}")


def _match(recon_dir: Path, gt_dir: Path) -> tuple[str, ...]:
    recon_names, gt_names = list_pngs(recon_dir), list_pngs(gt_dir)
    if not gt_names:
        raise BrainITError(f"no PNG images in the ground-truth folder {gt_dir}")
    only_recon = sorted(set(recon_names) - set(gt_names))
    only_gt = sorted(set(gt_names) - set(recon_names))
    if only_recon:
        raise BrainITError(
            f"{recon_dir / only_recon[0]} has no ground truth of the same name in {gt_dir} "
            f"({len(only_recon)} such files; {len(recon_names)} reconstructions, {len(gt_names)} ground truths)"
        )
    if only_gt:
        raise BrainITError(
            f"ground truth {gt_dir / only_gt[0]} has no reconstruction of the same name in {recon_dir} "
            f"({len(only_gt)} missing; {len(recon_names)} reconstructions, {len(gt_names)} ground truths)"
        )
    return tuple(recon_names)


def _check_sizes(folder: Path, names: tuple[str, ...]) -> None:
    """All images of one set must share one size (they are batched); reads only the PNG headers."""
    first = None
    for name in names:
        with open_image(folder / name) as image:
            size = image.size
        if first is None:
            first = (name, size)
        elif size != first[1]:
            raise BrainITError(
                f"{folder / name} is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                "all images of a set must have the same size"
            )


def _embeddings_file(*folders: Path) -> Path | None:
    for folder in dict.fromkeys(folders):  # ordered, without duplicates
        if (folder / EMBEDDINGS_FILE).is_file():
            return folder / EMBEDDINGS_FILE
    return None


def discover(recons: Path, gt: Path, kind: str | None = None) -> list[EvalSet]:
    """Pair up reconstructions and ground truths (see the module docstring for the layouts).

    Raises:
        BrainITError: missing folders, unmatched file names, mixed image sizes, bad embeddings.
    """
    for label, folder in (("--recons", recons), ("--gt", gt)):
        if not folder.is_dir():
            raise BrainITError(f"{label} {folder} is not a folder")
    subjects = sorted(p.name for p in recons.iterdir() if p.is_dir() and SUBJECT_DIR.match(p.name))
    entries = [(s, recons / s) for s in subjects] if subjects else [("all", recons)]
    sets = []
    for subject, folder in entries:
        image_dir = _image_dir(folder, kind)
        gt_dir = gt / subject if subject != "all" and (gt / subject).is_dir() else gt
        names = _match(image_dir, gt_dir)
        _check_sizes(image_dir, names)
        _check_sizes(gt_dir, names)
        embeddings = _embeddings_file(image_dir, folder)
        if embeddings is not None:
            load_embeddings(embeddings, names, check_only=True)
        sets.append(EvalSet(subject, image_dir, gt_dir, names, embeddings))
    return sets


def load_images(folder: Path, names: tuple[str, ...] | list[str]) -> Tensor:
    """Read PNGs as one uint8 batch (B, 3, H, W), converted to RGB."""
    import torch

    arrays = [read_rgb(folder / name) for name in names]  # (H, W, 3) uint8 each
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_embeddings(
    path: Path, names: tuple[str, ...], check_only: bool = False
) -> tuple[Tensor, Tensor] | None:
    """Read ``brain`` and ``image`` embeddings, in the order of ``names``.

    Args:
        path: the ``embeddings.npz``.
        names: the sorted PNG names of the set.
        check_only: validate (keys, counts, at least 300 rows) without returning arrays.

    Returns:
        ``(brain, image)`` float32, (N, D) each; ``None`` when ``check_only``.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:
        raise BrainITError(f"cannot read {path}: {err}") from err
    with data:
        missing = [key for key in ("brain", "image") if key not in data.files]
        if missing:
            raise BrainITError(
                f"{path} lacks the array(s) {', '.join(missing)}; it needs 'brain' and 'image'"
            )
        brain, image = data["brain"], data["image"]
        order = [str(n) for n in data["names"]] if "names" in data.files else list(names)
    if len(brain) != len(image) or len(brain) != len(order):
        raise BrainITError(
            f"{path}: 'brain' has {len(brain)} rows, 'image' {len(image)}, but there are {len(order)} images"
        )
    if sorted(order) != sorted(names):
        raise BrainITError(f"{path}: its 'names' do not match the PNG files of {path.parent}")
    if len(names) < SUBSET_SIZE:
        raise BrainITError(
            f"{path}: retrieval needs at least {SUBSET_SIZE} test items (300-way top-1), got {len(names)}; "
            "remove the embeddings file to skip retrieval"
        )
    if check_only:
        return None
    import torch

    index = {name: i for i, name in enumerate(order)}
    rows = [index[name] for name in names]
    return torch.from_numpy(brain[rows]).float().flatten(1), torch.from_numpy(image[rows]).float().flatten(1)
