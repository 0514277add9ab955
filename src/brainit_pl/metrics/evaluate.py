"""Score reconstructions against ground-truth images with the standard NSD metrics.

Writes OUT/metrics.md, OUT/metrics.csv and OUT/metrics.json: one row per subject (``subjNN/`` folders) or
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

from brainit_pl.devices import resolve_device
from brainit_pl.errors import BrainITError
from brainit_pl.metrics.folders import RECON_KINDS, discover, load_embeddings, load_images
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from brainit_pl.metrics.report import format_value, make_results, write_reports
from brainit_pl.metrics.suite import build_eval_suite, summarize

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
        help="feature networks: real weight files, or tiny random twins (smoke test) [real]",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="folder of the metric weight files [$BRAINIT_WEIGHTS or ~/.cache/brainit-pl/weights]",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=DEFAULT_PROTOCOL,
        help=f"evaluator whose preprocessing to reproduce [{DEFAULT_PROTOCOL}]",
    )
    parser.add_argument(
        "--kind",
        choices=RECON_KINDS,
        default=None,
        help="which reconstruct output to score in subjNN/<kind>/ [PNGs in subjNN/, else refined]",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="[cuda if available, else cpu]"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch [32]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the retrieval subsets [0]")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; returns the exit status. User errors raise BrainITError."""
    if args.batch_size < 1:
        raise BrainITError(f"--batch-size must be at least 1, got {args.batch_size}")
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
    )
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
    seed: int = 0,
) -> tuple[dict, dict[str, Path]]:
    """Score the PNG folders (the layouts of :mod:`brainit_pl.metrics.folders`) and write the reports.

    Returns:
        The results dict (the content of metrics.json) and the report files written in ``out``.
    """
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    sets = discover(recons, gt, kind)  # every folder problem surfaces before any compute
    suite = build_eval_suite(protocol, nets=nets, weights_dir=weights_dir, retrieval_seed=seed).to(dev)
    per_subject, counts = {}, {}
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
    n_images = len({(eval_set.gt_dir, name) for eval_set in sets for name in eval_set.names})
    results = make_results(protocol, per_subject, n_images)
    return results, write_reports(out, results, nets=nets, counts=counts)
