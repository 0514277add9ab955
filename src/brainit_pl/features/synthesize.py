"""Synthetic fMRI for external images: the trained Universal Encoder predicts every voxel of every subject.

Brain-IT trains on ~120k unlabeled COCO images paired with the encoder's predicted fMRI (docs/method.md §1).
This job writes that set: the external images into OUT/images.h5 (the store's image format, 224² and 112²,
external ids 0 .. N-1) and, per subject of the encoder checkpoint, OUT/fmri_subjNN.h5 with (N, V_s) float16
betas (layout: brainit_pl/data/synthetic_store.py). OUT defaults to STORE/synthetic.

Image sets: `--images simulated` (default) generates the simulator's external stream (never the NSD tree's
images); `--images-hdf5 PATH` reads a prepared set in MindEye2's format, dataset `images` (N, 3, S, S),
S >= 224 (S >= 256 also gives stage 2 its 256² copy), float16/float32 in [0, 1] or uint8, with an optional
`nsd_ids` (N,) (73k id, -1 for non-NSD images).

Leakage: the shared (test) images never enter synthetic data. Every external image is refused if its
declared nsd id is a shared image of STORE, or if its pixels (224² or 112²) equal a shared image's.

Resumable: each subject's file is written in place as fmri_subjNN.h5.partial with per-image `done` flags
flushed after every batch; re-running the same command computes only the missing rows (one backbone pass per
image for all subjects); a finished output of the same checkpoint (sha1) and images is left alone;
--overwrite starts over. On CUDA the encoder runs under bf16 autocast.

examples:
  brainit-pl synthesize-fmri --checkpoint runs/encoder/last.ckpt --store sim/store --n-images 1000
  brainit-pl synthesize-fmri --checkpoint encoder.ckpt --store store/nsd --images-hdf5 coco_unlabeled_224.hdf5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from tqdm.auto import tqdm

from brainit_pl.data.cache import discard_unreadable, image_fingerprint, partial_path
from brainit_pl.data.store import ImageStore, Store
from brainit_pl.data.store_writer import write_images
from brainit_pl.data.synthetic_store import (
    IMAGES_FILE,
    SharedImages,
    SyntheticFMRI,
    check_fmri_file,
    create_fmri_file,
    file_sha1,
    fmri_path,
    hdf5_source,
    simulated_source,
)
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path, load_module, output_lock

if TYPE_CHECKING:  # torch is imported where it runs: `brainit-pl synthesize-fmri --help` stays fast
    import torch

log = logging.getLogger(__name__)
DEFAULT_SIM_SIZE = 425  # NSD's stimulus side, for simulated images next to a store that is not simulated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl synthesize-fmri``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained EncoderModule checkpoint")
    parser.add_argument("--store", type=Path, required=True, help="the store the encoder was trained on")
    parser.add_argument("--out", type=Path, help="output folder (default: STORE/synthetic)")
    parser.add_argument("--images", choices=("simulated",), default="simulated", help="image set (default)")
    parser.add_argument(
        "--images-hdf5", type=Path, metavar="PATH", help="an image set (N, 3, S, S), S >= 224, instead"
    )
    parser.add_argument(
        "--n-images", type=int, default=1000, metavar="N", help="simulated images (default 1000)"
    )
    parser.add_argument(
        "--seed", type=int, help="simulated images' seed (default: the simulation's, so truth can score them)"
    )
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass")
    parser.add_argument("--device", help="torch device, e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: discard partial or finished output"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl synthesize-fmri`` with parsed ``args``."""
    out = synthesize_fmri(
        args.checkpoint, args.store, args.out, images="hdf5" if args.images_hdf5 else args.images,
        n_images=args.n_images, seed=args.seed, images_hdf5=args.images_hdf5, batch_size=args.batch_size,
        device=args.device, overwrite=args.overwrite,
    )  # fmt: skip
    sim_root = simulation_root(Store(args.store))
    if sim_root is not None and args.images_hdf5 is None:
        for subject, r in score_against_truth(out, sim_root).items():
            log.info("subject %d: median voxel r(synthetic, true response) = %.3f", subject, r)
    return 0


def synthesize_fmri(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    images: str = "simulated",
    n_images: int = 1000,
    seed: int | None = None,
    images_hdf5: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write (or finish) the synthetic fMRI of an external image set for every subject of the encoder.

    Args:
        checkpoint: an :class:`~brainit_pl.lit.encoder.EncoderModule` checkpoint.
        store: the store it was trained on (voxel counts are checked; its shared images are refused).
        out: the output folder (default ``STORE/synthetic``).
        images: ``"simulated"`` or ``"hdf5"`` (implied by ``images_hdf5``).
        n_images: N simulated images.
        seed: seed of the simulated images (``None``: the simulation's seed, else 0).
        images_hdf5: an (N, 3, S, S) image set, S >= 224 (see the module docstring).
        batch_size: images per forward pass.
        device: torch device (default ``"cuda"`` when available).
        overwrite: discard any earlier output in ``out`` and start over.

    Returns:
        The output folder.

    Raises:
        BrainITError: a bad option or checkpoint, a checkpoint whose voxels do not fit the store, an image set
            holding a shared (test) image, or an earlier output of another checkpoint or image set.
    """
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    images = "hdf5" if images_hdf5 is not None else images
    require(images in ("simulated", "hdf5"), f"images must be 'simulated' or 'hdf5', got {images!r}")
    require(images != "simulated" or n_images >= 1, f"--n-images must be at least 1, got {n_images}")
    require(images != "hdf5" or images_hdf5 is not None, "images='hdf5' needs images_hdf5")
    st = Store(store)
    out = Path(out) if out is not None else st.root / "synthetic"
    with output_lock(out):
        module, sha1 = _load_encoder(Path(checkpoint), st)
        fix = "pass --overwrite to start over"
        if overwrite and out.exists():
            for path in (out / IMAGES_FILE, *out.glob("fmri_subj*.h5*")):
                path.unlink()
        image_store = _external_images(out, st, images, n_images, seed, images_hdf5, fix)
        fingerprint = image_fingerprint(image_store)
        partials: dict[int, Path] = {}
        for subject, n_voxels in module.encoder.n_voxels.items():
            identity = {
                "subject": subject,
                "n_voxels": n_voxels,
                "checkpoint_sha1": sha1,
                "image_fingerprint": fingerprint,
            }
            final, partial = fmri_path(out, subject), partial_path(fmri_path(out, subject))
            if final.exists():
                check_fmri_file(final, identity, finished=True, fix=fix)
                continue
            if discard_unreadable(partial):
                check_fmri_file(partial, identity, finished=False, fix=fix)
            else:
                create_fmri_file(
                    partial, len(image_store.nsd_ids), n_voxels, {**identity, "checkpoint": str(checkpoint)}
                )
            partials[subject] = partial
        if not partials:
            log.info("%s is complete for this checkpoint and image set; nothing to do", out)
            return out
        import torch

        from brainit_pl.devices import resolve_device

        dev = resolve_device(device)
        try:
            with torch.inference_mode():
                _fill(partials, image_store, module.to(dev), dev, batch_size)
        except BaseException:
            log.warning("synthesis stopped; re-run the same command to resume in %s", out)
            raise
        for partial in partials.values():
            os.replace(partial, partial.with_suffix(""))  # fmri_subjNN.h5.partial -> fmri_subjNN.h5
        log.info("wrote %s: %d images x subjects %s", out, len(image_store.nsd_ids), sorted(partials))
        return out


def simulation_root(store: Store) -> Path | None:
    """The simulated NSD root a store was prepared from (it holds ``simulation/truth.json``), or None."""
    root = store.manifest.get("source", {}).get("root")
    if root and (Path(root) / "simulation" / "truth.json").is_file():
        return Path(root)
    return None


def _load_encoder(checkpoint: Path, store: Store):
    """The checkpoint's EncoderModule (CPU, eval) and the checkpoint's sha1, checked against the store."""
    from brainit_pl.lit.encoder import EncoderModule

    require(checkpoint.is_file(), f"--checkpoint {checkpoint} not found")
    try:
        module = load_module(EncoderModule, checkpoint)
    except (RuntimeError, KeyError, TypeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torch's messages span lines
        raise BrainITError(f"--checkpoint {checkpoint} is not an EncoderModule checkpoint ({first})") from err
    for subject, n_voxels in module.encoder.n_voxels.items():
        require(
            subject in store.subjects and store.subject(subject).n_voxels == n_voxels,
            f"--checkpoint {checkpoint} predicts {n_voxels} voxels for subject {subject}, but the store "
            f"{store.root} has {store.subject(subject).n_voxels if subject in store.subjects else 'no'} "
            "voxels for it; use the store the encoder was trained on",
        )
    return module.eval(), file_sha1(checkpoint)


def _external_images(
    out: Path,
    store: Store,
    kind: str,
    n_images: int,
    seed: int | None,
    hdf5: str | os.PathLike | None,
    fix: str,
) -> ImageStore:
    """OUT/images.h5 for this image set: reused when it matches, else written after the leakage checks."""
    shared = SharedImages(store)
    if kind == "simulated":
        sim_root = simulation_root(store)
        meta = json.loads((sim_root / "simulation" / "truth.json").read_text()) if sim_root else None
        seed = seed if seed is not None else (int(meta["seed"]) if meta else 0)
        size = int(meta["sizes"]["image_size"]) if meta else DEFAULT_SIM_SIZE
        spec, n, ids, source = f"simulated seed={seed} size={size} n={n_images}", n_images, None, None
    else:
        path = Path(hdf5).resolve()
        n, ids, source = hdf5_source(path)
        stat = path.stat()
        spec = f"hdf5 {path} n={n} bytes={stat.st_size} mtime={int(stat.st_mtime)}"
    where = f"image set ({spec})"
    shared.check_ids(ids, where)  # before anything is written
    final = out / IMAGES_FILE
    if final.exists():
        with h5py.File(final, "r") as h5:
            found, checked = str(h5.attrs.get("image_source")), str(h5.attrs.get("leakage_checked"))
        require(found == spec, f"{final} holds another image set ({found}), this run asks for {spec}; {fix}")
        require(checked == shared.digest, f"{final} was checked against another store's test images; {fix}")
        return ImageStore(final)
    if source is None:
        source = simulated_source(seed, size)
    created = not out.exists()
    try:
        with (
            atomic_path(final) as tmp,
            tqdm(total=n, desc="external images", unit="image", disable=None) as bar,
        ):

            def checked(ext_ids: np.ndarray) -> dict[int, np.ndarray]:
                block = source(ext_ids)
                shared.check_pixels(ext_ids, block, where)
                bar.update(len(ext_ids))
                return block

            write_images(tmp, np.arange(n), checked, source="external", batch=64)
            with h5py.File(tmp, "r+") as h5:
                h5.attrs.update({"image_source": spec, "leakage_checked": shared.digest})
    except BrainITError:
        if created:  # a refused set leaves nothing behind, not even the folder this run made
            shutil.rmtree(out, ignore_errors=True)
        raise
    return ImageStore(final)


def _fill(
    partials: dict[int, Path], images: ImageStore, module, device: torch.device, batch_size: int
) -> None:
    """Compute every row any subject's partial file lacks: one backbone pass per image, then each readout
    (under the caller's ``torch.inference_mode``).

    The backbone dominates the cost (a DINOv2 ViT-L pass vs a voxel readout), so the tokens of a batch are
    shared by all subjects instead of calling ``predict_voxels`` once per subject (same arithmetic).
    """
    import torch

    from brainit_pl.devices import inference_autocast

    enc = module.encoder
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(h5py.File(p, "r+")) for s, p in partials.items()}
        done = {s: f["done"][()] for s, f in files.items()}
        n = len(images.nsd_ids)
        todo = np.flatnonzero(~np.logical_and.reduce(list(done.values())))
        if len(todo) < n:
            log.info("resuming: %d of %d images already done for every subject", n - len(todo), n)
        voxel_ids = {s: enc.subject_voxel_ids(s, device=device) for s in files}
        bar = stack.enter_context(
            tqdm(total=n, initial=n - len(todo), desc="synthesize-fmri", unit="image", disable=None)
        )
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            x = torch.from_numpy(images.images(images.nsd_ids[rows], size=224)).to(device).float().div_(255.0)
            with inference_autocast(device):
                tokens = enc.tokens(x)  # (B, L, T, C)
            for s, f in files.items():
                need = ~done[s][rows]
                if not need.any():
                    continue
                with inference_autocast(device):
                    pred = enc.read(tokens[torch.from_numpy(need).to(device)], voxel_ids[s])  # (b, V_s)
                block = pred.float().cpu().numpy().astype(np.float16)
                require(
                    bool(np.isfinite(block).all()),
                    f"subject {s}: non-finite (or float16-overflowing) betas for external images {rows[need].tolist()}",
                )
                for j, r in enumerate(rows[need].tolist()):  # one chunk per row: a plain write each
                    f["betas"][r] = block[j]
                # flags after the rows they vouch for, flushed: an interruption loses at most this batch
                done[s][rows[need]] = True
                f["done"][...] = done[s]
                f.flush()
            bar.update(len(rows))


def score_against_truth(out: str | os.PathLike, sim_root: str | os.PathLike) -> dict[int, float]:
    """Per subject, the median over voxels of Pearson r (over images) between synthetic and true responses.

    Only for simulated external images made with the simulation's own seed and image size (otherwise
    the truth describes other images).

    Returns:
        subject → median voxel r (NaN voxels, i.e. constant over the images, skipped).
    """
    from brainit_pl.data.sim.stimuli import EXTERNAL_STREAM
    from brainit_pl.data.sim.truth import true_responses

    synth = SyntheticFMRI(out)
    meta = json.loads((Path(sim_root) / "simulation" / "truth.json").read_text())
    with h5py.File(synth.root / IMAGES_FILE, "r") as h5:
        spec = str(h5.attrs.get("image_source"))
    expected = f"simulated seed={meta['seed']} size={meta['sizes']['image_size']} n={synth.n_images}"
    require(spec == expected, f"{out} holds {spec}; the truth of {sim_root} describes {expected}")
    require(synth.n_images >= 2, "scoring against the truth needs at least 2 images")
    rows = np.arange(synth.n_images)
    scores = {}
    for subject in synth.subjects:
        pred = synth.betas(subject, rows).astype(np.float64)  # (N, V)
        true = true_responses(sim_root, subject, rows, stream=EXTERNAL_STREAM).astype(np.float64)
        require(true.shape == pred.shape, f"subject {subject}: truth {true.shape} != synthetic {pred.shape}")
        pc, tc = pred - pred.mean(0), true - true.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (pc * tc).sum(0) / np.sqrt((pc**2).sum(0) * (tc**2).sum(0))  # (V,)
        scores[subject] = float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")
    return scores
