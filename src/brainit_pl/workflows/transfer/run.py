"""Add a new subject S to trained base models from little data (docs/method.md §3, §7).

The base models (Universal Encoder, V2C clusters, semantic and low-level BITs, optionally the stage-2 model)
were trained without S. Only S's voxel embeddings are learned, everything else stays bit-identical:

1. encoder     S's encoder voxel embeddings on S's limited data (``--hours``); Adam lr 1e-3, 30 epochs
2. v2c         each voxel of S takes the cluster of its nearest reference voxel (cosine on the encoder
               embeddings; mm coordinates for anatomical clusters)
3. synthetic   the transferred encoder's synthetic fMRI of the external images (+ their CLIP tokens)
4. semantic    S's rows of the semantic BIT's voxel table, initialised from the nearest reference voxels'
5. lowlevel    rows (``--init nn``) or random; AdamW lr 5e-4 (constant, no warm-up), 50 epochs, 1 real : 3
               synthetic samples
6. stage2      S's rows of the stage-2 BIT (diffusion loss through the frozen UNet), lr 1e-5 after a 1,000-step
               warm-up, 200 epochs, batch 64 (8 per step × 8 accumulated); from the base stage-2 model with
               ``--stage2``, else from the pretrained unCLIP (``--epochs-stage2 0``: off)
7. reconstruct S's shared test images through `brainit-pl reconstruct`, scored: with the stage-2 model
               of step 6 (stage ``semantic``, the method), or, when stage 2 is off, with the stage-1 BIT and
               the stock unCLIP (stage ``semantic_stock``, the "without adapted CLIP" ablation)

OUT/<step>/ holds each step's output (checkpoints, TensorBoard logs under OUT/<step>/tb) and its
``result.json`` (settings, metrics, seconds), written last: a re-run skips finished steps (a finished step
made with other settings is refused; an interrupted training step starts over). OUT/summary.json gathers the
metrics and timings. The checkpoints load on their own: OUT/encoder/encoder.ckpt is an EncoderModule of the
base subjects + S (what ``synthesize-fmri`` reads), OUT/semantic|lowlevel/*.ckpt are BITModules with the
clusters OUT/v2c/clusters.npz (what ``reconstruct`` reads), OUT/stage2/stage2.ckpt a Stage2Module (what
``reconstruct --stage2`` reads) with OUT/stage2/semantic.ckpt (its adapted BIT as a BITModule). Training data
settings (voxels per sample, batch size, ...) are the base runs' (from their checkpoints), with S's data only;
trainings run on one device.

The defaults are the authors' transfer (docs/method.md §7): every trial of S's hours trains (no validation
split, ``--val-fraction 0``), so the rates stay constant (the plateau schedules have nothing to watch) and the
last epoch of each training is kept (``--keep last``). ``--val-fraction F --keep best`` holds out a fraction
of S's images and keeps the best validation epoch instead (the CPU demo does; a departure).

examples:
  brainit-pl transfer --store data/store --subject 2 --hours 1 --encoder base/encoder.ckpt \\
      --clusters base/v2c/clusters.npz --semantic base/semantic.ckpt --lowlevel base/lowlevel.ckpt \\
      --stage2 base/stage2.ckpt --images-hdf5 coco_unlabeled_224.hdf5 --out runs/transfer_subj02_1h
  brainit-pl transfer ... --init random --out runs/transfer_subj02_1h_random     # the init ablation
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainit_pl.errors import require
from brainit_pl.files import atomic_path, atomic_write_text, load_module

if TYPE_CHECKING:  # torch and Lightning are imported where they run: `brainit-pl transfer --help` is fast
    from brainit_pl.workflows.transfer.plan import Plan

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl transfer``."""
    add = parser.add_argument
    add("--store", type=Path, required=True, help="the prepared store holding S and the base subjects")
    add("--subject", type=int, required=True, help="the new subject S")
    add(
        "--hours", type=float, default=1.0, help="S's training data: 1, 0.5, 0.25 (first trials) (default: 1)"
    )
    add("--encoder", type=Path, required=True, help="base EncoderModule checkpoint")
    add("--clusters", type=Path, required=True, help="the base V2C clusters.npz")
    add("--semantic", type=Path, required=True, help="base semantic BIT checkpoint")
    add("--lowlevel", type=Path, required=True, help="base low-level BIT checkpoint")
    add("--stage2", type=Path, help="base stage-2 checkpoint (its UNet and BIT start stage 2)")
    add("--out", type=Path, required=True, help="output folder")
    add("--init", choices=("nn", "random"), default="nn", help="S's BIT voxel embeddings' init (default: nn)")
    add(
        "--external-images",
        type=int,
        default=1000,
        metavar="N",
        help="simulated external images (default: 1000)",
    )
    add(
        "--images-hdf5",
        type=Path,
        metavar="PATH",
        help="an external image set (N, 3, S, S), S >= 224, instead",
    )
    add("--external-ratio", type=float, default=3.0, help="synthetic samples per real one (default: 3)")
    add("--epochs-encoder", type=int, default=30, help="(default: 30)")
    add("--epochs-bit", type=int, default=50, help="(default: 50)")
    add("--epochs-stage2", type=int, default=200, help="0 skips stage 2 (default: 200, the authors')")
    add("--lr-encoder", type=float, default=1e-3, help="Adam (amsgrad) learning rate (default: 1e-3)")
    add("--lr-bit", type=float, default=5e-4, help="AdamW learning rate (default: 5e-4)")
    add("--lr-stage2", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    add("--bit-warmup-epochs", type=int, default=0, help="cubic warm-up epochs of the BITs (default: 0)")
    add(
        "--stage2-warmup-steps",
        type=int,
        default=1000,
        help="linear warm-up steps of stage 2 (default: 1000)",
    )
    add(
        "--stage2-accumulate",
        type=int,
        default=8,
        help="stage-2 micro-batches per optimizer step (default: 8)",
    )
    add(
        "--val-fraction",
        type=float,
        default=0.0,
        help="S's images held out for validation (default: 0, none)",
    )
    add(
        "--keep",
        choices=("last", "best"),
        default="last",
        help="checkpoint kept per training (default: last)",
    )
    add("--unclip", type=Path, help="MindEye2 unclip6 checkpoint (default: the weights folder's)")
    add("--tiny-unclip", action="store_true", help="the random tiny unCLIP twin (smoke tests)")
    add("--tiny-refine", action="store_true", help="add the refined stage with the tiny SDXL twin")
    add("--refine", type=Path, help="SDXL base for the refined stage")
    add(
        "--clip-pretrained",
        help="OpenCLIP weights for the external images' tokens (default: the weights folder's)",
    )
    add("--limit", type=int, help="at most N test images reconstructed")
    add("--dip-steps", type=int, default=1800, help="(default: 1800)")
    add("--dip-batch", type=int, default=16, help="(default: 16)")
    add("--dip-channels", type=int, default=128, help="(default: 128)")
    add("--nets", choices=("real", "tiny", "none"), default="real", help="metric networks (default: real)")
    add("--weights-dir", type=Path, help="weights folder (default: $BRAINIT_WEIGHTS)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--precision", help="Lightning precision (default: bf16-mixed on CUDA, else 32-true)")
    add("--num-workers", type=int, help="DataLoader workers (default: the base runs')")
    add("--seed", type=int, default=0, help="(default: 0)")
    add("--overwrite", action="store_true", help="discard every earlier step in OUT")


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl transfer`` with parsed ``args``."""
    summary = transfer(args)
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if k != "recon"}))
    return 0


# ------------------------------------------------------------------------------------------- inputs
def _encoder_step(plan: Plan, folder: Path) -> dict:
    from brainit_pl.lit.encoder import EncoderModule
    from brainit_pl.workflows.transfer.plan import fit_module, seed_run

    seed_run(plan)
    module = EncoderModule.transfer_from(plan.args.encoder, plan.new, lr=plan.args.lr_encoder)
    dm = plan.data("encoder", "encoder")
    epochs = plan.args.epochs_encoder
    return fit_module(plan, module, dm, folder, "encoder.ckpt", epochs, "val/voxel_corr_p75", "max")


def _v2c_step(plan: Plan, folder: Path) -> dict:
    """Nearest reference voxel of each of S's voxels: its cluster, and the BITs' init source."""
    import torch

    from brainit_pl.lit.checkpoints import read_checkpoint
    from brainit_pl.models.encoder import move_voxel_ids, voxel_offsets
    from brainit_pl.models.v2c import ClusterMap, l2_normalise, nearest_reference, save_clusters

    s, clusters = plan.args.subject, plan.clusters
    state = read_checkpoint(plan.out / "encoder" / "encoder.ckpt", "EncoderModule")["state_dict"]
    table = state["encoder.voxel_embed.weight"].float().numpy()  # (V_table, E): base rows as trained
    offsets = voxel_offsets(plan.table)
    rows = {t: table[offsets[t] : offsets[t] + v] for t, v in plan.table.items()}
    if clusters.kind == "anatomical":  # the ablation's clusters live in mm: so do its neighbours
        feats = {t: plan.store.subject(t).xyz.astype(np.float64) for t in plan.table}
    else:
        feats = {t: l2_normalise(r.astype(np.float64), f"subject {t}'s embeddings") for t, r in rows.items()}
    reference = np.concatenate([feats[t] for t in plan.base])  # (V_base, E), base global order
    labels, source = nearest_reference(feats[s], reference, clusters.cluster_of_voxel)  # (V_s,) each
    similarity = (feats[s] * reference[source]).sum(1) if clusters.kind != "anatomical" else None
    full = np.concatenate([labels if t == s else clusters.subject_labels(t) for t in plan.table])
    save_clusters(
        folder / "clusters.npz",
        ClusterMap(full, plan.table, clusters.n_clusters, clusters.kind, clusters.seed),
    )
    target = np.arange(offsets[s], offsets[s] + plan.new[s])
    source = move_voxel_ids(torch.from_numpy(source), plan.base, plan.table).numpy()
    with atomic_path(folder / "neighbours.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, target_ids=target, source_ids=source)
    base_start = np.array([offsets[t] for t in plan.base])
    by_subject = np.searchsorted(base_start, source, side="right") - 1
    return {
        "clusters": str(folder / "clusters.npz"),
        "kind": clusters.kind,
        "clusters_used": int(len(np.unique(labels))),
        "n_clusters": clusters.n_clusters,
        "neighbours_per_subject": {str(t): int((by_subject == i).sum()) for i, t in enumerate(plan.base)},
        "median_cosine": None if similarity is None else float(np.median(similarity)),
    }


def _synthetic_step(plan: Plan, folder: Path) -> dict:
    from brainit_pl.data.cache import FeatureCache, cache_path
    from brainit_pl.features.extract import extract_features
    from brainit_pl.features.synthesize import synthesize_fmri

    a = plan.args
    synthesize_fmri(
        plan.out / "encoder" / "encoder.ckpt", a.store, folder, n_images=a.external_images,
        images_hdf5=a.images_hdf5, device=a.device,
    )  # fmt: skip
    if (
        "clip" in plan.data_settings("semantic", "semantic")["features"]
    ):  # the semantic BIT's targets of the external images, by the store's CLIP
        ours = FeatureCache(cache_path(a.store, "clip"), plan.store.images)
        extract_features(
            folder, tiny=ours.arch == "tiny", pretrained=a.clip_pretrained, weights_dir=a.weights_dir,
            device=a.device,
        )  # fmt: skip
        from brainit_pl.data.synthetic_store import SyntheticFMRI

        theirs = FeatureCache(cache_path(folder, "clip"), SyntheticFMRI(folder).image_store)
        require(
            (theirs.arch, theirs.weights) == (ours.arch, ours.weights),
            f"the external images' CLIP tokens come from {theirs.arch} ({theirs.weights}) but the store's "
            f"from {ours.arch} ({ours.weights}); pass --clip-pretrained with the store's weights",
        )
    return {"folder": str(folder)}


def _bit_step(plan: Plan, folder: Path, branch: str, external: Path | None) -> dict:
    import torch

    from brainit_pl.lit.bit import BITModule
    from brainit_pl.workflows.transfer.plan import fit_module, seed_run

    a = plan.args
    neighbours = None
    if a.init == "nn":
        with np.load(plan.out / "v2c" / "neighbours.npz") as f:
            neighbours = torch.from_numpy(f["target_ids"]), torch.from_numpy(f["source_ids"])
    seed_run(plan)
    module = BITModule.transfer_from(
        getattr(a, branch), plan.new, plan.out / "v2c" / "clusters.npz", neighbours,
        lr=a.lr_bit, warmup_epochs=a.bit_warmup_epochs, quality_every_n_epochs=1,
    )  # fmt: skip
    dm = plan.data(
        branch, branch, external=_str(external), external_mode="ratio", external_ratio=a.external_ratio
    )
    return fit_module(plan, module, dm, folder, f"{branch}.ckpt", a.epochs_bit, "val/loss", "min")


def _stage2_step(plan: Plan, folder: Path, external: Path | None) -> dict:
    """S's rows of the semantic BIT trained with the diffusion loss; the adapted BIT (and UNet) exported."""
    import torch

    from brainit_pl.lit.bit import BITModule
    from brainit_pl.lit.stage2 import Stage2Module
    from brainit_pl.workflows.transfer.plan import FALLBACK_DATA, fit_module, seed_run

    a = plan.args
    semantic = plan.out / "semantic" / "semantic.ckpt"
    base = plan.ckpt.get("stage2", {}).get("hyper_parameters", {})
    names = ("offset_noise", "image_size", "source_size", "gradient_checkpointing")
    kept = {k: base[k] for k in names if k in base}
    seed_run(plan)
    module = Stage2Module(
        plan.table, bit_checkpoint=str(semantic), unclip=_str(a.unclip or base.get("unclip")),
        tiny_unclip=plan.tiny_unclip, trainable="voxel_embed", voxel_subjects=[a.subject], lr=a.lr_stage2,
        warmup_steps=a.stage2_warmup_steps, weights_dir=_str(a.weights_dir), seed=a.seed, **kept,
    )  # fmt: skip
    if a.stage2 is not None:
        module.init_from_stage2(a.stage2)
    base_data = "stage2" if a.stage2 is not None else "semantic"
    # Without a base stage-2 run, the semantic BIT's batch of 128 would not fit: stage 2's own per device.
    own = {"batch_size": FALLBACK_DATA["stage2"]["batch_size"], "global_batch_size": None}
    batch = {} if a.stage2 is not None else own
    size = module.hparams.source_size
    dm = plan.data(  # stage 2 reads the images (the base run's size), not the CLIP cache
        "stage2", base_data, external=_str(external), external_mode="ratio", external_ratio=a.external_ratio,
        features=[], image_sizes=[size], **batch,
    )  # fmt: skip
    result = fit_module(
        plan,
        module,
        dm,
        folder,
        "stage2.ckpt",
        a.epochs_stage2,
        "val/loss",
        "min",
        accumulate=a.stage2_accumulate,
    )
    # The kept weights are in ``module`` (the last epoch's, or the best that validate loaded): export them.
    bit = load_module(BITModule, semantic)
    bit.net.load_state_dict(module.net.state_dict())
    with atomic_path(folder / "semantic.ckpt") as tmp, open(tmp, "wb") as f:
        torch.save(bit.checkpoint_dict(), f)  # through Python's file: a full disk is an OSError (one line)
    result["semantic"] = str(folder / "semantic.ckpt")
    return result


def _reconstruct_step(plan: Plan, folder: Path, stage2: dict | None) -> dict:
    from brainit_pl.recon.reconstruct import reconstruct

    a = plan.args
    results = reconstruct(  # the method with stage 2; without it, only the ablation can run
        a.store, folder, lowlevel=plan.out / "lowlevel" / "lowlevel.ckpt",
        stage2=Path(stage2["checkpoint"]) if stage2 else None,
        semantic_stock=None if stage2 else plan.out / "semantic" / "semantic.ckpt",
        unclip=a.unclip, tiny_unclip=plan.tiny_unclip, refine=a.refine, tiny_refine=a.tiny_refine, subjects=[a.subject],
        limit=a.limit, dip_steps=a.dip_steps, dip_batch=a.dip_batch, dip_channels=a.dip_channels,
        nets=a.nets, weights_dir=a.weights_dir, device=a.device, seed=a.seed,
    )  # fmt: skip
    return {"metrics": {stage: r.get("mean", {}) for stage, r in results.items()}, "folder": str(folder)}


def _str(path: Path | str | None) -> str | None:
    return None if path is None else str(path)


# ---------------------------------------------------------------------------------------- the command
def transfer(args: argparse.Namespace) -> dict[str, Any]:
    """Run every step of the transfer (module docstring) and write OUT/summary.json.

    Args:
        args: the parsed options of ``brainit-pl transfer`` (:func:`add_arguments`).

    Returns:
        The summary: validation metrics of each training, reconstruction metrics, seconds per step.

    Raises:
        BrainITError: bad inputs (:class:`Plan`), a finished step of other settings in OUT, bad options.
    """
    from brainit_pl.workflows.transfer.plan import Plan, Steps, file_identity

    require(args.external_images >= 0, f"--external-images must be >= 0, got {args.external_images}")
    require(args.epochs_stage2 >= 0, f"--epochs-stage2 must be >= 0, got {args.epochs_stage2}")
    require(args.stage2_accumulate >= 1, f"--stage2-accumulate must be >= 1, got {args.stage2_accumulate}")
    require(
        args.keep == "last" or args.val_fraction > 0,
        "--keep best needs validation images: pass --val-fraction F (e.g. 0.1), or keep the last epoch",
    )
    plan = Plan(args)
    steps = Steps(args.out, args.overwrite)
    common = {"store": str(Path(args.store).resolve()), "subject": args.subject, "hours": args.hours}
    common.update(seed=args.seed, val_fraction=args.val_fraction, precision=args.precision, keep=args.keep)
    enc = {
        **common,
        "encoder": file_identity(args.encoder),
        "epochs": args.epochs_encoder,
        "lr": args.lr_encoder,
    }
    records = {"encoder": steps.run("encoder", enc, lambda f: _encoder_step(plan, f))}
    v2c = {"after": enc, "clusters": file_identity(args.clusters)}
    records["v2c"] = steps.run("v2c", v2c, lambda f: _v2c_step(plan, f))

    external = None
    if args.images_hdf5 is not None or args.external_images > 0:
        images = file_identity(args.images_hdf5) if args.images_hdf5 else {"simulated": args.external_images}
        synth = {"after": enc, "images": images, "clip": args.clip_pretrained}
        records["synthetic"] = steps.run(
            "synthetic", synth, lambda f: _synthetic_step(plan, f), resumable=True
        )
        external = args.out / "synthetic"
    bit = {"after": [v2c, records.get("synthetic", {}).get("settings")], "init": args.init}
    bit.update(
        epochs=args.epochs_bit, lr=args.lr_bit, warmup=args.bit_warmup_epochs, ratio=args.external_ratio
    )
    for branch in ("semantic", "lowlevel"):
        settings = {**bit, "base": file_identity(getattr(args, branch))}
        records[branch] = steps.run(branch, settings, lambda f, b=branch: _bit_step(plan, f, b, external))

    stage2 = None
    if args.epochs_stage2 > 0:
        settings = {"after": records["semantic"]["settings"], "base": file_identity(args.stage2)}
        settings.update(epochs=args.epochs_stage2, lr=args.lr_stage2, unclip=_str(args.unclip))
        settings.update(warmup_steps=args.stage2_warmup_steps, accumulate=args.stage2_accumulate)
        settings["tiny_unclip"] = plan.tiny_unclip
        stage2 = steps.run("stage2", settings, lambda f: _stage2_step(plan, f, external))
        records["stage2"] = stage2
    recon = {"after": [records[k]["settings"] for k in ("lowlevel", "semantic")]}
    recon.update(stage2=stage2["settings"] if stage2 else None, unclip=_str(args.unclip))
    recon.update(tiny_unclip=plan.tiny_unclip, refine=_str(args.refine), tiny_refine=args.tiny_refine)
    recon.update(limit=args.limit, dip_steps=args.dip_steps, dip_channels=args.dip_channels, nets=args.nets)
    records["reconstruct"] = steps.run(
        "reconstruct", recon, lambda f: _reconstruct_step(plan, f, stage2), resumable=True
    )
    summary = _summary(plan, records)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s", args.out / "summary.json")
    return summary


def _summary(plan: Plan, records: dict[str, dict]) -> dict[str, Any]:
    def val(step: str, key: str) -> float | None:
        return records.get(step, {}).get("val", {}).get(key)

    return {
        "subject": plan.args.subject,
        "hours": plan.args.hours,
        "init": plan.args.init,
        "base_subjects": sorted(plan.base),
        "n_voxels": plan.new[plan.args.subject],
        "encoder_val_corr_p75": val("encoder", "val/voxel_corr_p75"),
        "semantic_val_cos": val("semantic", "val/clip_cos"),
        "semantic_val_2way": val("semantic", "val/clip_2way"),
        "lowlevel_val_2way": val("lowlevel", "val/vgg_2way"),
        "stage2_val_loss": val("stage2", "val/loss"),
        "v2c": {k: records["v2c"][k] for k in ("clusters_used", "n_clusters", "median_cosine")},
        "recon": records["reconstruct"]["metrics"],
        "timings_s": {step: round(r["seconds"], 2) for step, r in records.items()},
        "outputs": {step: str(plan.out / step) for step in records},
    }
