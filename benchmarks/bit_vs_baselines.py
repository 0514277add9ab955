"""BIT vs the baselines on held-out feature prediction, and functional vs anatomical V2C clusters.

On a prepared store (default: the simulated demo store of ``make demo``), through the real CLI, each step
skipped when its output exists (re-running is cheap):

1. the CLIP cache of the store (``extract-features``; the tiny CLIP twin unless ``--real``);
2. the Universal Encoder (``configs/encoder_demo.yaml``), unless ``--encoder CKPT`` is given;
3. V2C clusters from its voxel embeddings (functional) and from voxel coordinates (anatomical), K=``--k``;
4. synthetic fMRI of ``--n-external`` external images for every subject, and their CLIP cache;
5. for each branch (semantic: CLIP tokens, low-level: VGG tokens), trains with the same data, loss,
   optimiser and schedule (``configs/sim/*.yaml``): the BIT with functional clusters, the BIT with
   anatomical clusters, the MindEye2-style baseline, and closed-form ridge; then tests each best-val
   checkpoint on the shared test images (which no training stage sees).

Prints a markdown table (``clip_cos``: mean token cosine of predicted vs true CLIP tokens; ``clip_2way`` /
``vgg_2way``: two-way identification on predicted vs true CLIP / VGG tokens; val at the best-val-loss epoch,
test on the shared images) and writes it with the numbers
to ``WORK/results.json`` and ``WORK/results.md``.

usage:
  python benchmarks/bit_vs_baselines.py                                 # demo store, ~1 h on 2 CPU cores
  python benchmarks/bit_vs_baselines.py --epochs 3 --branches semantic  # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "brainit_pl.cli"]
MODELS = ("bit", "bit_anatomical", "mindeye2", "ridge")
METRICS = {"semantic": ("clip_cos", "clip_2way"), "lowlevel": ("vgg_2way",)}


def sh(args: list[str], log: Path) -> None:
    """Run a brainit-pl command, its output appended to ``log``; stop with the log's tail on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print("  $ brainit-pl " + " ".join(args), flush=True)
    with open(log, "a") as f:
        proc = subprocess.run([*CLI, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): brainit-pl {' '.join(args)}\n{log.read_text()[-3000:]}")


def scalars(run: Path) -> dict[str, list[float]]:
    """Every scalar a finished run logged to TensorBoard (the newest version folder)."""
    events = sorted(run.rglob("events.out.tfevents.*"), key=os.path.getmtime)
    acc = EventAccumulator(str(events[-1]))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def prepare(args: argparse.Namespace, work: Path, log: Path) -> tuple[Path, dict[str, Path], Path | None]:
    """Steps 1–4: CLIP cache, encoder, clusters, synthetic fMRI. Returns (encoder, clusters, external)."""
    store, tiny = args.store, [] if args.real else ["--tiny"]
    if not (store / "features_clip.h5").exists():
        sh(["extract-features", "--store", str(store), *tiny], log)
    encoder = args.encoder
    if encoder is None:
        run = work / "encoder"
        found = sorted(run.rglob("last.ckpt"))
        if not found:
            sh(["fit", "--config", "configs/encoder_demo.yaml", "--data.store", str(store),
                "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
                "--trainer.max_epochs", str(args.encoder_epochs)], log)  # fmt: skip
            found = sorted(run.rglob("last.ckpt"))
        encoder = found[-1]
    clusters = {}
    for kind in ("functional", "anatomical"):
        out = work / f"v2c_{kind}"
        if not (out / "clusters.npz").exists():
            emb = ["--embeddings", str(encoder)] if kind == "functional" else []
            sh(["cluster", "--store", str(store), "--out", str(out), "--kind", kind,
                "--clusters", str(args.k), "--no-plots", *emb], log)  # fmt: skip
        clusters[kind] = out / "clusters.npz"
    external = None
    if args.n_external > 0:
        external = work / "synthetic"
        if not (external / "features_clip.h5").exists():
            sh(["synthesize-fmri", "--checkpoint", str(encoder), "--store", str(store),
                "--out", str(external), "--n-images", str(args.n_external)], log)  # fmt: skip
            sh(["extract-features", "--store", str(external), *tiny], log)
    return encoder, clusters, external


def train_and_test(
    args: argparse.Namespace, work: Path, log: Path, branch: str, model: str, clusters: dict, external
) -> dict[str, float]:
    """Fit one model (skipped when done), test its best-val checkpoint; its val and test numbers."""
    kind = "ridge" if model == "ridge" else "mindeye2" if model == "mindeye2" else "bit"
    config = ROOT / "configs" / "sim" / f"{kind}_{branch}.yaml"
    run = work / branch / model
    common = ["--config", str(config), "--data.store", str(args.store)]
    if kind == "bit":
        which = "anatomical" if model == "bit_anatomical" else "functional"
        common += ["--model.init_args.clusters", str(clusters[which])]
    fit_extra = ["--trainer.default_root_dir", str(run / "fit")]
    if kind != "ridge":
        fit_extra += ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []
        fit_extra += ["--data.external", str(external)] if external else []
    t0 = time.perf_counter()
    done = run / "fit" / "done"
    if not done.exists():
        sh(["fit", *common, *fit_extra], log)
        done.write_text("ok\n")
    fit_s = time.perf_counter() - t0
    best = sorted(p for p in (run / "fit").rglob("*.ckpt") if p.name != "last.ckpt")
    ckpt = best[-1] if best else sorted((run / "fit").rglob("last.ckpt"))[-1]
    if not (run / "test" / "lightning_logs").exists():
        sh(["test", *common, "--trainer.default_root_dir", str(run / "test"), "--ckpt_path", str(ckpt)], log)
    val, test = scalars(run / "fit"), scalars(run / "test")
    best = min(range(len(val["val/loss"])), key=val["val/loss"].__getitem__) if "val/loss" in val else -1
    out = {"fit_s": round(fit_s, 1)}
    for name in METRICS[branch]:
        values = val.get(f"val/{name}", [])
        out[f"val_{name}"] = values[best] if len(values) > best >= 0 else float("nan")
        out[f"test_{name}"] = test.get(f"test/{name}", [float("nan")])[-1]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=ROOT / "demo" / "store")
    parser.add_argument("--work", type=Path, default=ROOT / "demo" / "runs" / "bench_bit")
    parser.add_argument("--encoder", type=Path, help="a trained encoder checkpoint (default: train one)")
    parser.add_argument("--encoder-epochs", type=int, default=15, help="encoder training epochs [15]")
    parser.add_argument("--k", type=int, default=25, help="V2C clusters (default: 25, the simulator's types)")
    parser.add_argument("--n-external", type=int, default=1000, help="external images (0: none)")
    parser.add_argument("--epochs", type=int, help="override the configs' max_epochs")
    parser.add_argument("--branches", nargs="+", default=["semantic", "lowlevel"], choices=list(METRICS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--real", action="store_true", help="real CLIP weights instead of the tiny twin")
    args = parser.parse_args()
    args.store, work = args.store.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    print(f"store {args.store}; work {work}; log {log}", flush=True)
    encoder, clusters, external = prepare(args, work, log)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for branch in args.branches:
        for model in args.models:
            print(f"{branch} / {model}", flush=True)
            results.setdefault(branch, {})[model] = train_and_test(
                args, work, log, branch, model, clusters, external
            )
    columns = [(b, n) for b in results for n in METRICS[b]]
    lines = ["| model | " + " | ".join(f"val {n} | test {n}" for _, n in columns) + " |"]
    lines.append("|---|" + "---|---|" * len(columns))
    for model in args.models:
        cells = []
        for branch, name in columns:
            r = results[branch][model]
            cells += [f"{r[f'val_{name}']:.3f}", f"{r[f'test_{name}']:.3f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (work / "results.md").write_text(table + "\n")
    (work / "results.json").write_text(json.dumps({"encoder": str(encoder), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
