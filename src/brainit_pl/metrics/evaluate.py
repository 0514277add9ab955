"""Score reconstructions against ground-truth images with the standard NSD metrics.

Writes OUT/metrics.md, OUT/metrics.csv and OUT/metrics.json (and OUT/report.html, a page with the ground
truth beside the reconstructions and the metrics with their intervals): one row per subject (``subjNN/`` folders) or
one row ``all`` (a flat folder), their mean, the protocol, the number of test images, and the published
Brain-IT / MindEye2 rows for context.

  brainit-pl evaluate --recons runs/recons --gt nsd/test_images --out runs/eval
  brainit-pl evaluate --recons A --gt B --out C --nets tiny          # smoke test, no weight files

Folder layouts (flat, subjNN/, subjNN/<kind>/ from `brainit-pl reconstruct`) and the optional
embeddings.npz for retrieval: see docs/metrics.md. Real networks load their weight files from --weights-dir
(default $BRAINIT_WEIGHTS, else ~/.cache/brainit-pl/weights; data/README.md lists them).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from brainit_pl.errors import BrainITError
from brainit_pl.files import atomic_write_text
from brainit_pl.metrics import bootstrap
from brainit_pl.metrics.folders import RECON_KINDS, discover, load_embeddings, load_images
from brainit_pl.metrics.html import Gallery, write_html_report
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, PROTOCOLS, RETRIEVAL_SEED, get_protocol

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl evaluate``."""
    parser.add_argument(
        "--recons", type=Path, required=True, help="folder of reconstructed PNGs (flat or subjNN/)"
    )
    parser.add_argument(
        "--gt", type=Path, required=True, help="folder of ground-truth PNGs with the same file names"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for metrics.md/.csv/.json")
    parser.add_argument(
        "--nets",
        choices=("real", "tiny"),
        default="real",
        help="feature networks: real weight files, or tiny random twins (smoke test) (default: real)",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="folder of the metric weight files (default: $BRAINIT_WEIGHTS or ~/.cache/brainit-pl/weights)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=DEFAULT_PROTOCOL,
        help=f"evaluator whose preprocessing to reproduce (default: {DEFAULT_PROTOCOL})",
    )
    parser.add_argument(
        "--kind",
        choices=RECON_KINDS,
        default=None,
        help="which reconstruct output to score in subjNN/<kind>/ (default: PNGs in subjNN/, else refined)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="(default: cuda if available, else cpu)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument(
        "--antialias",
        action="store_true",
        help="mindeye2 only: antialias the bilinear resizes (torchvision >= 0.17); default: none, as "
        "MindEye2's pinned torchvision 0.16.0 did",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=RETRIEVAL_SEED,
        help=f"seed of the retrieval subsets (default: {RETRIEVAL_SEED}, MindEye2's)",
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=bootstrap.N_BOOT,
        help=f"bootstrap resamples for the confidence intervals; 0: none (default: {bootstrap.N_BOOT})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; returns the exit status. User errors raise BrainITError."""
    if args.batch_size < 1:
        raise BrainITError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.n_boot < 0:
        raise BrainITError(f"--n-boot must be 0 or more, got {args.n_boot}")
    if args.antialias and args.protocol != "mindeye2":
        raise BrainITError(
            "--antialias applies to the mindeye2 protocol only (Brain-Diffuser resizes with PIL)"
        )
    results, paths = evaluate_folders(
        args.recons,
        args.gt,
        args.out,
        kind=args.kind,
        nets=args.nets,
        weights_dir=args.weights_dir,
        protocol=args.protocol,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
        antialias=True if args.antialias else None,  # None: the protocol default
        n_boot=args.n_boot,
    )
    from brainit_pl.metrics.report import format_value

    mean = ", ".join(f"{name} {format_value(name, v)}" for name, v in results["mean"].items())
    log.info("%s protocol, %d test images; mean: %s", args.protocol, results["n_images"], mean)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def evaluate_folders(
    recons: Path,
    gt: Path,
    out: Path,
    *,
    kind: str | None = None,
    nets: str = "real",
    weights_dir: Path | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    device: str | None = None,
    batch_size: int = 32,
    seed: int = RETRIEVAL_SEED,
    antialias: bool | None = None,
    n_boot: int = bootstrap.N_BOOT,
    ci_level: float = bootstrap.LEVEL,
    ci_seed: int = bootstrap.SEED,
) -> tuple[dict, dict[str, Path]]:
    """Score the PNG folders (the layouts of :mod:`brainit_pl.metrics.folders`) and write the reports.

    Args:
        seed: seed of the retrieval subsets.
        antialias: ``mindeye2`` only; ``None`` keeps the protocol's default (no antialiasing).
        n_boot: bootstrap resamples of the per-image values for the ``<metric>_ci`` intervals; 0: none.
        ci_level: coverage of the intervals.
        ci_seed: seed of the resamples.

    Returns:
        The results dict (the content of metrics.json) and the report files written in ``out``.
    """
    from tqdm.auto import tqdm

    from brainit_pl.devices import resolve_device  # torch: imported here, not for `--help`
    from brainit_pl.metrics.report import make_results, write_reports
    from brainit_pl.metrics.suite import build_eval_suite, per_image_values, summarize

    dev = resolve_device(device)
    proto = get_protocol(protocol) if antialias is None else get_protocol(protocol, antialias=antialias)
    sets = discover(recons, gt, kind)  # every folder problem surfaces before any compute
    suite = build_eval_suite(proto, nets=nets, weights_dir=weights_dir, retrieval_seed=seed).to(dev)
    for metric in suite.values():  # one process scores the folders, also inside a DDP run: no gathering
        metric.sync_on_compute = metric._to_sync = False  # torchmetrics copies the flag at init (_to_sync)
    per_subject, counts, ci, per_image = {}, {}, {}, {}
    for eval_set in sets:
        suite.reset()
        names = eval_set.names
        batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
        for batch in tqdm(batches, desc=f"evaluate {eval_set.subject}", unit="batch", disable=None):
            suite.update(
                recons=load_images(eval_set.recon_dir, batch).to(dev),  # (B, 3, H, W) uint8
                gt=load_images(eval_set.gt_dir, batch).to(dev),
            )
        if eval_set.embeddings is not None:
            brain, image = load_embeddings(eval_set.embeddings, names)
            suite.update(brain_embeds=brain.to(dev), image_embeds=image.to(dev))
        per_subject[eval_set.subject] = summarize(suite.compute())
        counts[eval_set.subject] = len(names)
        per_image[eval_set.subject] = (names, per_image_values(suite))
        if n_boot > 0:
            ci[eval_set.subject] = {
                name: bootstrap.bootstrap_ci(values, n_boot=n_boot, level=ci_level, seed=ci_seed)
                for name, values in per_image[eval_set.subject][1].items()
            }
    n_images = len({(eval_set.gt_dir, name) for eval_set in sets for name in eval_set.names})
    ci_method = {
        "kind": "percentile bootstrap over images",
        "n_boot": n_boot,
        "level": ci_level,
        "seed": ci_seed,
    }
    results = make_results(
        proto,
        per_subject,
        n_images,
        ci=ci if n_boot > 0 else None,
        ci_method=ci_method,
        options={"retrieval_seed": seed, "retrieval_subsets": "30 x 300"},
    )
    if n_boot > 0 and per_image:  # the interval of the mean over subjects, the tables' number
        metrics = set.intersection(*(set(values) for _, values in per_image.values()))
        results["mean_ci"] = {
            f"{name}_ci": list(
                bootstrap.stratified_bootstrap_ci(
                    [values[name] for _, values in per_image.values()],
                    n_boot=n_boot,
                    level=ci_level,
                    seed=ci_seed,
                )
            )
            for name in sorted(metrics)
        }
    files = write_reports(out, results, nets=nets, counts=counts)
    files["per_image"] = write_per_image(out / "per_image.csv", per_image)
    files["html"] = write_html_report(
        out / "report.html",
        title=f"brainit-pl evaluate: {recons}",
        results={kind or "reconstructions": results},
        galleries=[
            Gallery(s.subject, s.gt_dir, {kind or "reconstruction": s.recon_dir}, s.names) for s in sets
        ],
        notes=[f"Reconstructions {recons}, ground truth {gt}, feature networks: {nets}."],
    )
    return results, files


def write_per_image(path: Path, per_image: dict[str, tuple[list[str], dict]]) -> Path:
    """``subject,image,<metric>...`` rows: the per-image values behind each mean (for paired comparisons)."""
    import csv
    import io

    metrics = sorted({name for _, values in per_image.values() for name in values})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", "image", *metrics])
    for subject, (names, values) in per_image.items():
        for i, name in enumerate(names):
            row = [float(values[m][i]) if m in values else "" for m in metrics]
            writer.writerow([subject, name, *row])
    atomic_write_text(path, buffer.getvalue())
    return path
