"""``brainit-pl reconstruct``: the shared test images from fMRI, stage by stage (docs/method.md §6).

For every test image of every subject (repeats averaged, all voxels):

1. **lowlevel**: the low-level BIT predicts the 7,190 VGG tokens → DIP inversion (:mod:`.dip`);
2. **semantic**: the stage-2 model (``--stage2``) — its adapted BIT predicts the 256 CLIP tokens, its
   fine-tuned unCLIP UNet samples from the DIP image (:mod:`brainit_pl.models.unclip`; without
   ``--lowlevel``, from noise). This is the method;
   **semantic_stock** (the ablation "without adapted CLIP", only with ``--semantic-stock``): a stage-1
   semantic BIT sampled with the stock unCLIP UNet (``--unclip`` / ``--tiny-unclip``), same noise;
3. **refined** (optional): SDXL img2img on the semantic image (:mod:`.refine`).

Output folder ``OUT``::

    OUT/gt/subjNN/NNNNN.png           the 224² stimuli each subject's images are scored against (file name:
                                      the 0-based 73k id, 5 digits; --limit picks other images per subject)
    OUT/subjNN/<stage>/NNNNN.png      224² reconstructions, stage = lowlevel | semantic | semantic_stock |
                                      refined
    OUT/subjNN/<stage>.npz            the same as arrays: nsd_id (N,), images (N, 3, 224, 224) uint8
    OUT/metrics_<stage>/metrics.*     the metric suite on that stage, a row per subject (evaluate's report)
    OUT/reconstructions.png           ground truth | stages, the first images of every subject
    OUT/report.html                   one self-contained page: ground truth beside each stage per subject,
                                      every stage's metrics with their intervals
    OUT/run.json                      the settings (a resumed run that saved images must match them);
                                      ``finished`` at the end

An interrupted run continues where it stopped (images whose PNGs all exist are not redone); a finished one
is refused unless ``--overwrite``. Every PNG is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path, atomic_write_text, output_lock

if TYPE_CHECKING:  # torch is imported where it runs: `brainit-pl reconstruct --help` stays fast
    import torch

    from brainit_pl.recon.chain import Reconstructor

log = logging.getLogger(__name__)

SIZE = 224  # every stage is saved and scored at the metrics' 224²
GRID_IMAGES = 6  # images per subject in reconstructions.png
STAGE_LABELS = {  # the rows of reconstructions.png
    "lowlevel": "low-level (DIP)",
    "semantic": "semantic (stage 2)",
    "semantic_stock": "stock unCLIP (ablation)",
    "refined": "refined (SDXL)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl reconstruct``."""
    parser.add_argument("--store", type=Path, required=True, help="the prepared store (its shared images)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--lowlevel", type=Path, help="low-level BIT checkpoint (brainit-pl fit, branch lowlevel)"
    )
    parser.add_argument(
        "--stage2", type=Path, help="stage-2 checkpoint (adapted BIT + fine-tuned UNet): stage `semantic`"
    )
    parser.add_argument(
        "--semantic-stock",
        type=Path,
        help="ablation 'without adapted CLIP': a stage-1 semantic BIT checkpoint sampled with the stock "
        "unCLIP UNet, as stage `semantic_stock`",
    )
    parser.add_argument("--semantic", type=Path, help=argparse.SUPPRESS)  # gone: refused with a pointer
    parser.add_argument(
        "--unclip",
        type=Path,
        help="the stock UNet of --semantic-stock: MindEye2's unclip6 checkpoint (default: the weights folder's "
        "unclip6_epoch0_step110000.ckpt)",
    )
    parser.add_argument(
        "--tiny-unclip",
        action="store_true",
        help="the stock UNet has the tiny twin's architecture: --unclip's tiny checkpoint (configs/sim/"
        "unclip_pretrain_demo.yaml), else random weights (smoke tests)",
    )
    parser.add_argument(
        "--unclip-size",
        type=int,
        help="image side of the stock UNet (default: the stage-2 model's, else 256)",
    )
    parser.add_argument(
        "--refine", type=Path, help="SDXL base (single file or diffusers folder): adds `refined`"
    )
    parser.add_argument("--tiny-refine", action="store_true", help="random tiny SDXL twin for `refined`")
    parser.add_argument(
        "--subjects", type=int, nargs="+", help="subjects to reconstruct (default: all of the checkpoints')"
    )
    parser.add_argument("--limit", type=int, help="at most N test images per subject (quick looks)")
    parser.add_argument(
        "--dip-steps", type=int, default=1800, help="DIP Adam steps per image (default: 1800)"
    )
    parser.add_argument(
        "--dip-lr",
        type=float,
        default=1e-3,
        help="DIP Adam learning rate (default: 1e-3, the method's for 1800 steps; with far fewer steps (a CPU preview) "
        "use a larger one, e.g. 1e-2 for 100)",
    )
    parser.add_argument("--dip-batch", type=int, default=16, help="images inverted together (default: 16)")
    parser.add_argument(
        "--dip-channels",
        type=int,
        default=128,
        help="DIP network width (default: 128, the method's; fewer on a CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="test images per step (default: 16)")
    parser.add_argument(
        "--nets", choices=("real", "tiny", "none"), default="real", help="metric networks (default: real)"
    )
    parser.add_argument("--weights-dir", type=Path, help="weights folder (default: $BRAINIT_WEIGHTS)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the DIP and diffusion noise (default: 0)"
    )
    parser.add_argument("--overwrite", action="store_true", help="discard a finished (or other) run in OUT")


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl reconstruct`` with parsed ``args``."""
    require(
        args.semantic is None,
        "--semantic is gone: the method samples with the stage-2 model (--stage2 CKPT); a stage-1 semantic BIT "
        "with the stock unCLIP UNet is the ablation --semantic-stock CKPT",
    )
    reconstruct(**{k: v for k, v in vars(args).items() if k not in ("command", "func", "semantic")})
    return 0


def reconstruct(
    store: Path,
    out: Path,
    *,
    lowlevel: Path | None = None,
    stage2: Path | None = None,
    semantic_stock: Path | None = None,
    unclip: Path | None = None,
    tiny_unclip: bool = False,
    unclip_size: int | None = None,
    refine: Path | None = None,
    tiny_refine: bool = False,
    subjects: list[int] | None = None,
    limit: int | None = None,
    dip_steps: int = 1800,
    dip_lr: float = 1e-3,
    dip_batch: int = 16,
    dip_channels: int = 128,
    batch_size: int = 16,
    nets: str = "real",
    weights_dir: Path | None = None,
    device: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Reconstruct, save and score the shared test images; see the module docstring.

    Returns:
        stage → the metrics results dict (empty with ``nets="none"``).

    Raises:
        BrainITError: no model given, an unreadable or mismatched checkpoint, a finished or different run in
            ``out`` (without ``overwrite``), bad options.
    """
    with output_lock(out):
        out = Path(out)
        require(
            lowlevel is not None or stage2 is not None or semantic_stock is not None,
            "give --lowlevel and/or --stage2 checkpoints (or the ablation --semantic-stock)",
        )
        require(refine is None or not tiny_refine, "give --refine or --tiny-refine, not both")
        require(
            stage2 is not None or semantic_stock is not None or not (refine or tiny_refine),
            "the refinement needs a semantic stage (--stage2)",
        )
        require(dip_steps >= 1 and dip_batch >= 1 and batch_size >= 1, "steps and batch sizes must be >= 1")
        require(dip_lr > 0, f"--dip-lr must be positive, got {dip_lr}")
        require(limit is None or limit >= 1, f"--limit must be >= 1, got {limit}")
        from brainit_pl.recon.chain import STAGES, Reconstructor  # torch: not for `--help`

        stages = [s for s, on in zip(STAGES, (lowlevel, stage2, semantic_stock, refine or tiny_refine)) if on]
        settings = {
            "store": str(Path(store).resolve()),
            "lowlevel": _identity(lowlevel),
            "stage2": _identity(stage2),
            "semantic_stock": _identity(semantic_stock),
            "unclip": _stock_unclip(unclip, tiny_unclip, unclip_size) if semantic_stock else None,
            "refine": "tiny" if tiny_refine else (str(refine) if refine else None),
            "dip_steps": dip_steps,
            "dip_lr": dip_lr,
            "dip_channels": dip_channels,
            "seed": seed,
            "stages": stages,
        }
        _check_claim(out, settings, overwrite)  # refusals first: loading real models takes minutes
        from brainit_pl.devices import resolve_device

        dev = resolve_device(device)
        models = Reconstructor.from_checkpoints(
            lowlevel, stage2, semantic_stock=semantic_stock, unclip=unclip, tiny_unclip=tiny_unclip,
            unclip_size=unclip_size, refine=refine, tiny_refine=tiny_refine, weights_dir=weights_dir, device=dev, dip_steps=dip_steps,
            dip_lr=dip_lr, dip_batch=dip_batch, dip_channels=dip_channels, seed=seed,
        )  # fmt: skip
        loader = _test_loader(store, models.n_voxels, batch_size)
        wanted = set(models.n_voxels if subjects is None else subjects)
        unknown = wanted - set(models.n_voxels)
        require(
            not unknown, f"subjects {sorted(unknown)} are not in the checkpoints' {sorted(models.n_voxels)}"
        )
        claim_folder(out, settings, overwrite)  # only now, with every input valid, is the folder touched
        done_per_subject: dict[int, int] = {}
        from tqdm.auto import tqdm

        for batch in tqdm(loader, desc="reconstruct", unit="batch", disable=None):
            subject = int(batch["subject"][0])
            if subject not in wanted:
                continue
            rows = []
            for i in range(len(batch["nsd_id"])):
                if limit is not None and done_per_subject.get(subject, 0) >= limit:
                    break
                done_per_subject[subject] = done_per_subject.get(subject, 0) + 1
                rows.append(i)
            if rows:
                reconstruct_missing(out, {k: v[rows] for k, v in batch.items()}, models)
        results = finish(out, stages, sorted(done_per_subject), nets, weights_dir, device)
        mark_finished(out, settings)
        log.info("reconstructions of %d subject(s) in %s", len(done_per_subject), out)
        return results


def _test_loader(store: Path, n_voxels: dict[int, int], batch_size: int):
    """The shared test images of the checkpoints' subjects: per-subject batches, all voxels, 224² images."""
    from brainit_pl.data.datamodule import NSDDataModule

    dm = NSDDataModule(
        str(store), subjects=sorted(n_voxels), image_sizes=[224, 112], eval_batch_size=batch_size
    )
    require(
        dm.n_voxels == n_voxels,
        f"the store {store} has voxel counts {dm.n_voxels} but the checkpoints were trained on {n_voxels}",
    )
    dm.setup("test")
    return dm.test_dataloader()


# ----------------------------------------------------------------------------------------------- files
def reconstruct_missing(out: Path, batch: dict[str, torch.Tensor], chain: Reconstructor) -> None:
    """Reconstruct and save the images of a batch (one subject) that ``out`` does not hold yet.

    An image counts as done when the PNGs of all ``chain.stages`` exist; a done image whose ground truth is
    missing gets only that. A resumed run therefore redoes nothing finished.
    """
    subject = int(batch["subject"][0])
    keep, gt_missing = [], []
    for i, nsd_id in enumerate(batch["nsd_id"].tolist()):
        if not all((out / f"subj{subject:02d}" / s / _name(nsd_id)).exists() for s in chain.stages):
            keep.append(i)
        elif not (out / "gt" / f"subj{subject:02d}" / _name(nsd_id)).exists():
            gt_missing.append(i)  # reconstructed by an earlier run: only its ground truth to write
    if gt_missing:
        names = [_name(batch["nsd_id"][i]) for i in gt_missing]
        _save_pngs(out / "gt" / f"subj{subject:02d}", names, batch["image_224"][gt_missing])
    if keep:
        part = {k: v[keep] for k, v in batch.items()}
        save_batch(out, part, chain(part))


def save_batch(out: Path, batch: dict[str, torch.Tensor], images: dict[str, torch.Tensor]) -> None:
    """Every stage's images of a batch (one subject) and its ground truth, as 224² PNGs."""
    subject, names = int(batch["subject"][0]), [_name(i) for i in batch["nsd_id"].tolist()]
    for stage, pixels in images.items():
        _save_pngs(out / f"subj{subject:02d}" / stage, names, _resize(pixels))
    _save_pngs(out / "gt" / f"subj{subject:02d}", names, batch["image_224"])


def _resize(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] == SIZE:
        return images
    from torch.nn.functional import interpolate

    return interpolate(
        images.float(), size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
    )


def _save_pngs(folder: Path, names: list[str], images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for name, hwc in zip(names, pixels):
        with atomic_path(folder / name) as tmp:
            Image.fromarray(hwc).save(tmp, format="PNG")


def _name(nsd_id: int) -> str:
    return f"{int(nsd_id):05d}.png"


# ------------------------------------------------------------------------------------- bookkeeping
def _identity(path: Path | None) -> dict[str, Any] | None:
    """What a resumed run must share: a checkpoint's path, size and modification time."""
    if path is None:
        return None
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} not found")
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def _stock_unclip(unclip: Path | None, tiny: bool, size: int | None) -> dict[str, Any]:
    """The stock UNet of ``semantic_stock`` as a resumed run must share it."""
    weights = _identity(unclip) if unclip else ("tiny, random" if tiny else "weights folder")
    return {"weights": weights, "tiny": tiny, "image_size": size}


def _check_claim(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse (writing nothing) a finished or different run in ``out``, or a foreign folder, without ``overwrite``."""
    run_file = out / "run.json"
    if overwrite:
        return
    if run_file.exists():
        before = json.loads(run_file.read_text())
        require(
            not before.pop("finished", False),
            f"{out} already holds a finished reconstruction; pass --overwrite to redo it (or pick another --out)",
        )
        differ = sorted(k for k in settings if before.get(k) != settings[k])
        require(
            not differ or not _holds_images(out),  # a run stopped before its first image: nothing to keep
            f"{out} holds an interrupted run with other settings ({', '.join(differ)}); resume it with the same "
            "options or pass --overwrite",
        )
    elif out.exists() and any(out.iterdir()):
        raise BrainITError(
            f"{out} is not empty and holds no reconstruct run; pass --overwrite or another --out"
        )


def _holds_images(out: Path) -> bool:
    """True once a run in ``out`` has saved a reconstruction (its work a different run must not mix with)."""
    return any(out.glob("subj*/*/*.png"))


def claim_folder(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Start or resume the run in ``out`` (after :func:`_check_claim` and the inputs' validation)."""
    _check_claim(out, settings, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    elif (out / "run.json").exists():
        log.info("resuming the interrupted run in %s (finished images are kept)", out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.json", json.dumps(settings, indent=2) + "\n")


def mark_finished(out: Path, settings: dict[str, Any]) -> None:
    """Record in ``run.json`` that the run in ``out`` is complete (a rerun is then refused)."""
    atomic_write_text(out / "run.json", json.dumps({**settings, "finished": True}, indent=2) + "\n")


def finish(out: Path, stages, subjects: list[int], nets: str, weights_dir, device) -> dict[str, Any]:
    """Arrays, the grid and the metric reports of a complete folder."""
    from brainit_pl.metrics.evaluate import evaluate_folders
    from brainit_pl.metrics.folders import read_rgb
    from brainit_pl.metrics.html import reconstruction_report
    from brainit_pl.viz import save_image_grid

    rows: list[list[np.ndarray]] = [[] for _ in range(1 + len(stages))]
    columns: list[str] = []
    for subject in subjects:
        sub = out / f"subj{subject:02d}"
        names = sorted(p.name for p in (sub / stages[0]).glob("*.png"))
        for stage in stages:
            arrays = np.stack([read_rgb(sub / stage / n).transpose(2, 0, 1) for n in names])
            with atomic_path(sub / f"{stage}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, nsd_id=np.array([int(n[:-4]) for n in names]), images=arrays)
        shown = names[:GRID_IMAGES]
        columns += [f"s{subject} #{int(n[:-4])}" for n in shown]
        for row, folder in zip(rows, [out / "gt" / sub.name, *(sub / s for s in stages)]):
            row.extend(read_rgb(folder / n) for n in shown)
    if rows[0]:
        labels = ["ground truth", *(STAGE_LABELS.get(s, s) for s in stages)]
        save_image_grid(
            out / "reconstructions.png", [np.stack(r) for r in rows], row_labels=labels, col_labels=columns
        )
    results: dict[str, Any] = {}
    for stage in stages if nets != "none" else ():
        results[stage], _ = evaluate_folders(
            out,
            out / "gt",
            out / f"metrics_{stage}",
            kind=stage,
            nets=nets,
            weights_dir=weights_dir,
            device=device,
        )
    reconstruction_report(out)
    return results
