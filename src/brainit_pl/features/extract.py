"""Extract the CLIP patch tokens of every image of a store into its feature cache (STORE/features_clip.h5).

STORE is a prepared store (`prepare`) or a synthetic-fMRI folder (`synthesize-fmri`: its external images,
OUT/images.h5, get their cache at OUT/features_clip.h5, which the NSDDataModule reads with `external: OUT`).

Each image's 224² pixels go through the frozen OpenCLIP ViT-bigG-14 vision tower (with MindEye2's
(x + 1) / 2 preprocessing, see brainit_pl/backbones/clip.py) and its 256 × 1664 patch tokens are stored as
float16 (≈ 0.85 MB per image; ≈ 8.5 GB for one subject's 10k images). The NSDDataModule streams them with
`features: [clip]`.

Batched, with a progress bar; resumable: the cache is written in place into STORE/features_clip.h5.partial,
whose per-image `done` flags are flushed after every batch, and renamed to its final name when every image
is done. Re-running the same command after an interruption computes only the unfinished images; a finished
cache of the same images and weights is left as it is. --overwrite starts over. On CUDA the network runs
under bf16 (fp16 where bf16 is unsupported) autocast.

examples:
  brainit-pl extract-features --store store/nsd
  brainit-pl extract-features --store store/nsd --pretrained /weights/open_clip_pytorch_model.bin --batch-size 32
  brainit-pl extract-features --store sim/store --tiny        # the tiny random twin (smoke tests)
  brainit-pl extract-features --store store/nsd/synthetic     # the external images of synthesize-fmri
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from tqdm.auto import tqdm

from brainit_pl.data.cache import (
    BACKBONES,
    IDENTITY_ATTRS,
    cache_path,
    check_cache_file,
    create_cache_file,
    discard_unreadable,
    image_fingerprint,
    partial_path,
)
from brainit_pl.data.store import ImageStore, Store
from brainit_pl.data.synthetic_store import IMAGES_FILE
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import output_lock

if TYPE_CHECKING:  # torch is imported where it runs: `brainit-pl extract-features --help` stays fast
    import torch

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl extract-features``."""
    parser.add_argument(
        "--store",
        type=Path,
        required=True,
        metavar="STORE",
        help="a store folder (`prepare`) or a synthetic-fMRI folder (`synthesize-fmri`)",
    )
    parser.add_argument(
        "--backbone", choices=BACKBONES, default="clip", help="which features (default: clip)"
    )
    parser.add_argument(
        "--pretrained",
        metavar="PATH",
        help="OpenCLIP checkpoint file or local-dir: folder (default: ViT-bigG-14 laion2b_s39b_b160k in the "
        "weights folder)",
    )
    parser.add_argument("--tiny", action="store_true", help="use the tiny random twin (tests and smoke runs)")
    parser.add_argument(
        "--weights-dir", type=Path, metavar="DIR", help="weights folder (default: $BRAINIT_WEIGHTS)"
    )
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass")
    parser.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: discard a partial or finished cache"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl extract-features`` with parsed ``args``."""
    extract_features(
        args.store,
        backbone=args.backbone,
        pretrained=args.pretrained,
        tiny=args.tiny,
        weights_dir=args.weights_dir,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
    )
    return 0


def extract_features(
    store: str | os.PathLike,
    *,
    backbone: str = "clip",
    pretrained: str | os.PathLike | None = None,
    tiny: bool = False,
    weights_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write (or finish) the feature cache of the store's images.

    Args:
        store: a store folder with an image store, or a synthetic-fMRI folder (``images.h5`` and no
            ``manifest.json``: the external images of ``synthesize-fmri``).
        backbone: which features (``"clip"``: (256, D) patch tokens of :func:`~brainit_pl.backbones.build_clip`).
        pretrained, tiny, weights_dir: passed to ``build_clip``.
        batch_size: images per forward pass.
        device: torch device (default: ``"cuda"`` when available, else ``"cpu"``).
        overwrite: discard an existing partial or finished cache and start over.

    Returns:
        The cache file, ``STORE/features_<backbone>.h5`` (next to the images either way).

    Raises:
        BrainITError: no store or image store, a bad option, an existing cache of other images or weights
            (without ``overwrite``), a partial cache started with other options, non-finite tokens.
    """
    require(
        backbone in BACKBONES, f"unknown feature backbone {backbone!r}; expected one of {list(BACKBONES)}"
    )
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    with output_lock(store):
        images = _image_store(Path(store))
        final, partial = cache_path(store, backbone), partial_path(cache_path(store, backbone))
        fingerprint = image_fingerprint(images)
        identity = {"backbone": backbone, "arch": "tiny" if tiny else "ViT-bigG-14"}
        identity["weights"] = _weights_label(pretrained, tiny)
        if overwrite:
            partial.unlink(missing_ok=True)  # the finished cache (if any) is replaced only at the end
        elif final.exists():
            _check_existing(final, images, fingerprint, identity, finished=True)
            log.info("%s is complete for this image store; nothing to do", final)
            return final
        from brainit_pl.devices import resolve_device

        dev = resolve_device(device)
        resume = discard_unreadable(partial)
        if (
            resume
        ):  # before building the network: a wrong partial file fails in a second, not after loading 10 GB
            _check_existing(partial, images, fingerprint, identity, finished=False)
        net = _build(pretrained, tiny, weights_dir).to(dev)
        if not resume:
            attrs = {**identity, "image_fingerprint": fingerprint}
            create_cache_file(partial, images.nsd_ids, n_tokens=net.n_tokens, width=net.width, attrs=attrs)
        try:
            _fill(partial, images, net, dev, batch_size)
        except BaseException:
            log.warning("extraction stopped; re-run the same command to resume from %s", partial)
            raise
        os.replace(partial, final)
        log.info("wrote %s (%d images, %d x %d tokens)", final, len(images.nsd_ids), net.n_tokens, net.width)
        return final


def _image_store(root: Path) -> ImageStore:
    """The images of a store, or of a synthetic-fMRI folder: one has a manifest, the other only images.h5."""
    if not (root / "manifest.json").is_file() and (root / IMAGES_FILE).is_file():
        return ImageStore(root / IMAGES_FILE)
    return Store(root).images  # a store, or neither: Store's error says what is missing


def _weights_label(pretrained: str | os.PathLike | None, tiny: bool) -> str:
    """The name recorded for the weights (a resumed or reused cache must have been made with the same)."""
    if pretrained is not None:
        return Path(str(pretrained).removeprefix("local-dir:")).name
    if tiny:
        return "random (seed 0)"
    from brainit_pl.backbones.clip import WEIGHTS_KEY
    from brainit_pl.backbones.weights import WEIGHT_FILES

    return Path(WEIGHT_FILES[WEIGHTS_KEY].path).parent.name  # the folder: .bin and .safetensors alike


def _check_existing(
    path: Path, images: ImageStore, fingerprint: str, identity: dict[str, str], *, finished: bool
) -> None:
    """Check that ``path`` was made from these images with these options; else say how to start over."""
    what = "a finished cache" if finished else "an interrupted extraction"
    fix = "pass --overwrite to start over"
    try:
        with h5py.File(path, "r") as h5:
            attrs = check_cache_file(h5, path, images, fingerprint, fix=fix)
            if finished:
                require(bool(h5["done"][()].all()), f"{path} is not finished; {fix}")
    except (OSError, KeyError) as err:
        raise BrainITError(f"{path} ({what}) is not a readable feature cache ({err}); {fix}") from err
    for key in IDENTITY_ATTRS:
        require(
            str(attrs.get(key)) == identity[key],
            f"{path} ({what}) was made with {key} {attrs.get(key)!r}, this run uses {identity[key]!r}; "
            f"use the same options, or {fix}",
        )


def _build(pretrained: str | os.PathLike | None, tiny: bool, weights_dir: str | os.PathLike | None):
    from brainit_pl.backbones.clip import build_clip  # open_clip is heavy: imported only when extracting

    return build_clip(pretrained=pretrained, tiny=tiny, weights_dir=weights_dir)


def _encode(net: torch.nn.Module, pixels: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 images (B, 3, 224, 224) → tokens (B, T, D) float16."""
    import torch

    from brainit_pl.devices import inference_autocast

    with torch.inference_mode():
        x = (
            torch.from_numpy(pixels).to(device).float().div_(255.0)
        )  # [0, 1], as the store's readers give them
        with inference_autocast(device):
            tokens = net(x)  # (B, T, D)
        return tokens.float().cpu().numpy().astype(np.float16)


def _fill(
    path: Path, images: ImageStore, net: torch.nn.Module, device: torch.device, batch_size: int
) -> None:
    """Compute every row of the cache at ``path`` whose ``done`` flag is false, batch by batch.

    Reading the next batch's images is not overlapped with the forward pass: a batch of 16 images is a few
    ms of HDF5 reads against ~0.1 s of ViT-bigG on a GPU.
    """
    with h5py.File(path, "r+") as h5:
        tokens, done_flags = h5["tokens"], h5["done"]
        require(
            tokens.shape[1:] == (net.n_tokens, net.width),
            f"{path} holds tokens of shape {tokens.shape[1:]}, the network makes {(net.n_tokens, net.width)}; "
            "pass --overwrite to start over",
        )
        done = done_flags[()]
        todo = np.flatnonzero(~done)
        if done.any():
            log.info("resuming %s: %d of %d images already done", path.name, int(done.sum()), len(done))
        with tqdm(
            total=len(done), initial=int(done.sum()), desc="extract-features", unit="image", disable=None
        ) as bar:
            for start in range(0, len(todo), batch_size):
                rows = todo[start : start + batch_size]
                block = _encode(net, images.images(images.nsd_ids[rows], size=224), device)
                bad = ~np.isfinite(block).all(axis=(1, 2))
                require(
                    not bad.any(),
                    f"non-finite (or float16-overflowing) tokens for images {images.nsd_ids[rows][bad].tolist()}",
                )
                for j, r in enumerate(rows.tolist()):  # one chunk per row: a plain write each
                    tokens[r] = block[j]
                # flags after the tokens they vouch for, flushed, so an interruption loses at most this batch
                done[rows] = True
                done_flags[...] = done
                h5.flush()
                bar.update(len(rows))
    require(bool(done.all()), f"{path}: {int((~done).sum())} images were not extracted")
