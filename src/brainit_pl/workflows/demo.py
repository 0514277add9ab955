"""``brainit-pl demo``: the whole method on the simulated NSD, one step after another, into one report.

Steps (each skipped when its output exists, so re-running is cheap; every command's output goes to
``OUT/log.txt``):

1. ``simulate`` the demo NSD and ``prepare`` its store (``--store`` to use an existing store instead);
2. the tiny CLIP cache (``extract-features --tiny``);
3. the Universal Encoder (``configs/encoder_demo.yaml``), scored against ridge on the backbone features;
4. V2C clusters, functional (from the encoder) and anatomical, with their ARI against the true voxel types;
5. synthetic fMRI of external images for every subject, and their CLIP cache;
6. for each branch (semantic, low-level): the BIT, the MindEye2-style baseline and ridge, trained on the
   same data and targets (``configs/sim/*.yaml``), each best-val checkpoint tested on the shared images;
7. unCLIP pretraining at twin scale (``configs/sim/unclip_pretrain_demo.yaml``): the tiny VAE and unCLIP
   UNet learn the stimuli of the training images from their tiny-CLIP tokens (the stand-in for MindEye2's
   unclip6), then stage 2 (``configs/sim/stage2_demo.yaml``): the semantic BIT and that UNet fine-tuned
   together, at the pretraining's 64²;
8. ``reconstruct`` as the paper does it — low-level BIT → DIP, then the stage-2 model → unCLIP (stage
   ``semantic``) — and the ablation stage-1 BIT + the pretrained, not fine-tuned, tiny unCLIP
   (``semantic_stock``), with the tiny metric networks;
9. the report ``OUT/report/``: ``metrics.md`` / ``metrics.json`` (per reconstruction stage),
   ``reconstructions.png``, ``clusters.png``, ``summary.json`` (the science in numbers), and ``report.html``
   (all of it on one self-contained page, with the brain maps).

Every model is a tiny twin and the data is simulated: the numbers check the pipeline and the method's
relative claims on a brain whose truth is known, they are not comparable with published NSD results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_write_text, load_module
from brainit_pl.packaged_configs import packaged_config

log = logging.getLogger(__name__)

MODELS = {"bit": "bit", "mindeye2_baseline": "mindeye2", "ridge_baseline": "ridge"}
METRICS = {"semantic": ("clip_cos", "clip_2way"), "lowlevel": ("vgg_2way",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl demo``."""
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="work and report folder (default: runs/demo)"
    )
    parser.add_argument(
        "--store", type=Path, help="an existing store (default: simulate + prepare the demo preset in OUT)"
    )
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (default: 0)")
    parser.add_argument("--encoder-epochs", type=int, default=6, help="(default: 6)")
    parser.add_argument(
        "--semantic-epochs",
        type=int,
        default=15,
        help="epochs of the semantic BIT and MindEye2 (default: 15)",
    )
    parser.add_argument(
        "--lowlevel-epochs", type=int, default=5, help="epochs of the low-level BIT and MindEye2 (default: 5)"
    )
    parser.add_argument("--bit-epochs", type=int, help="set both --semantic-epochs and --lowlevel-epochs")
    parser.add_argument(
        "--jobs", type=int, default=2, help="trainings run side by side, one torch thread each (default: 2)"
    )
    parser.add_argument("--clusters", type=int, default=25, help="V2C clusters K (default: 25)")
    parser.add_argument(
        "--n-external", type=int, default=500, help="external images (0: none) (default: 500)"
    )
    parser.add_argument(
        "--external-mode",
        choices=("concat", "ratio"),
        default="concat",
        help="how the semantic BIT and MindEye2 mix in the external samples: every external image once per "
        "epoch (concat, the authors' base training: a third of ratio 3's steps, the same held-out scores on the "
        "demo store) or 3 synthetic samples per real one (ratio, their transfer's) (default: concat)",
    )
    parser.add_argument(
        "--lowlevel-external-ratio",
        type=float,
        default=1.0,
        help="synthetic samples per real one in the low-level branch, always mixed by ratio (measured on the demo "
        "store: concat at 7 epochs 0.774 VGG two-way, ratio 1 at 5 epochs 0.836, in the same time) (default: 1); "
        "its VGG targets and contrastive loss are computed per sample, so each synthetic one costs a real one's time",
    )
    parser.add_argument(
        "--recon-images", type=int, default=10, help="test images reconstructed per subject (default: 10)"
    )
    parser.add_argument(
        "--dip-steps", type=int, default=100, help="(default: 100, a CPU preview; the method uses 1800)"
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="(default: all)"
    )
    parser.add_argument(
        "--anatomical-bit", action="store_true", help="also train the BITs on anatomical clusters (ablation)"
    )
    parser.add_argument(
        "--dip-lr", type=float, default=1e-2, help="(default: 1e-2, for 100 steps; the method: 1e-3 for 1800)"
    )
    parser.add_argument(
        "--unclip-epochs",
        type=int,
        default=10,
        help="epochs of the tiny unCLIP pretraining, the VAE's 2 included; 0: stage 2 adapts the random twin "
        "(default: 10)",
    )
    parser.add_argument("--stage2-epochs", type=int, default=3, help="epochs of stage 2 (default: 3)")
    parser.add_argument(
        "--no-reconstruct", action="store_true", help="stop after the feature models (no stage 2)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl demo`` with parsed ``args``."""
    summary = Demo(args).run()
    print(json.dumps({k: summary[k] for k in ("bit", "recon") if k in summary}, indent=2))
    return 0


class Demo:
    """The steps of the module docstring; ``self.summary`` fills as they run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out / "log.txt"
        self.summary: dict[str, Any] = {"timings_s": {}}

    # ------------------------------------------------------------------------------------ plumbing
    def sh(self, *args: str) -> None:
        """Run ``brainit-pl ARGS`` (output to the log); stop with the log's tail on failure."""
        self.sh_parallel([list(args)], threads=None)

    def sh_parallel(self, commands: list[list[str]], threads: int | None = 1) -> None:
        """Run ``brainit-pl`` commands at once (``threads`` torch threads each; ``None``: torch's default).

        Each writes its own ``OUT/log_<i>.txt``, appended to ``OUT/log.txt`` when all have ended; the first
        failure stops the run with the log's tail.
        """
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        procs = []
        for i, args in enumerate(commands):
            print("  $ brainit-pl " + " ".join(args), flush=True)
            log_file = self.out / f"log_{i}.txt"
            with open(log_file, "w") as f:
                cmd = [sys.executable, "-m", "brainit_pl.cli", *args]
                procs.append(
                    (args, log_file, subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
                )
        failed = [args for args, _, proc in procs if proc.wait() != 0]
        with open(self.log_file, "a") as f:
            for _, log_file, _ in procs:
                f.write(log_file.read_text())
                log_file.unlink()
        if failed:
            tail = self.log_file.read_text()[-2000:]
            raise BrainITError(
                f"step failed: brainit-pl {' '.join(failed[0])} (see {self.log_file}):\n{tail}"
            )

    def step(self, name: str, done: Path, action) -> None:
        """Run ``action`` unless ``done`` exists; record its seconds."""
        if done.exists():
            print(f"[{name}] done ({done.relative_to(self.out) if done.is_relative_to(self.out) else done})")
            return
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        action()
        self.summary["timings_s"][name] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {self.summary['timings_s'][name]:.1f} s", flush=True)

    # ---------------------------------------------------------------------------------------- steps
    def run(self) -> dict[str, Any]:
        a, out = self.args, self.out
        store = a.store.resolve() if a.store else out / "store"
        nsd = out / "nsd"
        if a.store is None:
            self.step("simulate", nsd / "simulation" / "truth.json",
                      lambda: self.sh("simulate", "--out", str(nsd), "--preset", "demo", "--seed", str(a.seed), "--overwrite"))  # fmt: skip
            self.step("prepare", store / "manifest.json",
                      lambda: self.sh("prepare", "--nsd-root", str(nsd), "--out", str(store), "--overwrite"))  # fmt: skip
        self.step("clip features", store / "features_clip.h5",
                  lambda: self.sh("extract-features", "--store", str(store), "--tiny"))  # fmt: skip
        reconstructs = "bit" in a.models and not a.no_reconstruct
        pretrain = reconstructs and a.unclip_epochs > 0
        # The encoder and the unCLIP pretraining read only the store and its CLIP cache: side by side.
        self._side_by_side([self._encoder_job(store), *([self._unclip_job(store)] if pretrain else [])])
        encoder = self._encoder(store)
        clusters = self._clusters(store, encoder, _simulation_root(store))
        external = out / "synthetic"
        if a.n_external > 0:
            self.step("synthetic fMRI", external / "features_clip.h5", lambda: (
                self.sh("synthesize-fmri", "--checkpoint", str(encoder), "--store", str(store), "--out", str(external),
                        "--n-images", str(a.n_external), "--overwrite"),
                self.sh("extract-features", "--store", str(external), "--tiny")))  # fmt: skip
        ckpts: dict[str, Path] = {}
        for branch in ("semantic", "lowlevel"):
            jobs = [(key, kind, clusters["functional"]) for key, kind in MODELS.items() if key in a.models]
            jobs += [("bit_anatomical", "bit", clusters["anatomical"])] if a.anatomical_bit else []
            self._train_side_by_side(store, branch, jobs, external if a.n_external > 0 else None)
            for key, kind in MODELS.items():
                if key in a.models:
                    ckpts[f"{branch}/{key}"] = self._feature_model(store, branch, key, kind, clusters["functional"],
                                                                   external if a.n_external > 0 else None)  # fmt: skip
            if a.anatomical_bit:
                ckpts[f"{branch}/bit_anatomical"] = self._feature_model(
                    store, branch, "bit_anatomical", "bit", clusters["anatomical"],
                    external if a.n_external > 0 else None)  # fmt: skip
        if reconstructs:
            unclip = self._run_job(self._unclip_job(store)) if pretrain else None
            stage2 = self._stage2(store, ckpts["semantic/bit"], unclip)
            self._reconstruct(store, ckpts["lowlevel/bit"], stage2, ckpts["semantic/bit"], unclip)
            self._linear_baseline(store)
            self.summary["recon_comparisons"] = recon_comparisons(self.out / "reconstruct")
        self._report(store)
        return self.summary

    def _encoder_job(self, store: Path) -> tuple[str, Path, list[str]]:
        run = self.out / "encoder"
        return "encoder", run / "done", [
            "fit", "--config", str(packaged_config("encoder_demo")), "--data.store", str(store),
            "--trainer.default_root_dir", str(run), "--trainer.max_epochs", str(self.args.encoder_epochs),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip

    def _unclip_job(self, store: Path) -> tuple[str, Path, list[str]]:
        run = self.out / "unclip_pretrain"
        export = run / "unclip_tiny.ckpt"  # the sgm checkpoint: written last, so also the step's done file
        return "unCLIP pretraining", export, [
            "fit", "--config", str(packaged_config("sim/unclip_pretrain_demo")), "--data.store", str(store),
            "--model.init_args.export", str(export), "--trainer.default_root_dir", str(run / "fit"),
            "--trainer.max_epochs", str(self.args.unclip_epochs)]  # fmt: skip

    def _run_job(self, job: tuple[str, Path, list[str]]) -> Path:
        """One job of :meth:`_side_by_side` on its own (skipped when done); its done file."""
        name, done, cmd = job

        def action() -> None:
            self.sh(*cmd)
            if not done.exists():
                done.write_text("ok\n")

        self.step(name, done, action)
        return done

    def _encoder(self, store: Path) -> Path:
        run = self.out / "encoder"
        self._run_job(self._encoder_job(store))
        ckpt = sorted(run.rglob("last.ckpt"))[-1]
        scores = run / "scores.json"
        self.step("encoder vs ridge", scores, lambda: _score_encoder(ckpt, store, scores))
        self.summary["encoder"] = json.loads(scores.read_text())
        return ckpt

    def _clusters(self, store: Path, encoder: Path, truth: Path | None) -> dict[str, Path]:
        paths = {}
        for kind in ("functional", "anatomical"):
            folder = self.out / f"v2c_{kind}"
            extra = ["--embeddings", str(encoder)] if kind == "functional" else ["--no-plots"]
            extra += ["--truth", str(truth)] if truth is not None and kind == "functional" else []
            self.step(f"V2C {kind}", folder / "clusters.npz", lambda f=folder, e=extra, k=kind: self.sh(
                "cluster", "--store", str(store), "--out", str(f), "--kind", k,
                "--clusters", str(self.args.clusters), *e))  # fmt: skip
            paths[kind] = folder / "clusters.npz"
        agreement = self.out / "v2c_functional" / "agreement.json"
        if agreement.exists():
            report = json.loads(agreement.read_text())
            self.summary["v2c"] = {
                "k": report["n_clusters"],
                "ari_functional": report["ari"]["pooled"],
                "ari_anatomical": report["anatomical_baseline_ari"]["pooled"],
            }
        return paths

    def _epochs(self, branch: str) -> int:
        a = self.args
        if getattr(a, "bit_epochs", None) is not None:
            return a.bit_epochs
        return a.semantic_epochs if branch == "semantic" else a.lowlevel_epochs

    def _fit_args(self, store: Path, branch: str, key: str, kind: str, clusters: Path, external):
        """The ``fit`` arguments of one feature model, and the ``test`` arguments' common part."""
        run = self.out / branch / key
        common = ["--config", str(packaged_config(f"sim/{kind}_{branch}")), "--data.store", str(store)]
        common += ["--model.init_args.clusters", str(clusters)] if kind == "bit" else []
        fit = ["--trainer.default_root_dir", str(run / "fit")]
        if kind != "ridge":
            fit += ["--trainer.max_epochs", str(self._epochs(branch))]
            if external and branch == "lowlevel":
                mix = [
                    "--data.external_mode",
                    "ratio",
                    "--data.external_ratio",
                    str(self.args.lowlevel_external_ratio),
                ]
            else:
                mix = ["--data.external_mode", self.args.external_mode]
            fit += ["--data.external", str(external), *mix] if external else []
        return ["fit", *common, *fit], common

    def _train_side_by_side(self, store: Path, branch: str, jobs: list, external) -> None:
        """Train the branch's unfinished iterative models (BIT, MindEye2) ``--jobs`` at a time."""
        self._side_by_side(
            [
                (f"{branch} {key}", self.out / branch / key / "fit" / "done", fit)
                for key, kind, clusters in jobs
                if kind != "ridge"
                for fit in [self._fit_args(store, branch, key, kind, clusters, external)[0]]
            ]
        )

    def _side_by_side(self, jobs: list[tuple[str, Path, list[str]]]) -> None:
        """Run the unfinished ``(name, done file, brainit-pl args)`` jobs ``--jobs`` at a time, one thread each.

        Small models on a few cores: two processes with one torch thread each get more done than one
        process with two threads, which mostly wait on each other (measured on the 2-core demo machine).
        Fewer than two unfinished jobs: nothing runs here (each job's own step runs it the usual way).
        """
        todo = [job for job in jobs if not job[1].exists()]
        if len(todo) < 2 or getattr(self.args, "jobs", 1) < 2:
            return
        while todo:
            batch, todo = todo[: self.args.jobs], todo[self.args.jobs :]
            print(f"[{', '.join(name for name, _, _ in batch)}] side by side", flush=True)
            start = time.perf_counter()
            self.sh_parallel([cmd for _, _, cmd in batch])
            for name, done, _ in batch:
                if not done.exists():  # a marker (an export is its own)
                    done.write_text("ok\n")
                self.summary["timings_s"][name] = round(time.perf_counter() - start, 1)

    def _feature_model(self, store: Path, branch: str, key: str, kind: str, clusters: Path, external) -> Path:
        run = self.out / branch / key
        fit, common = self._fit_args(store, branch, key, kind, clusters, external)

        def train() -> None:
            self.sh(*fit)
            (run / "fit" / "done").write_text("ok\n")

        self.step(f"{branch} {key}", run / "fit" / "done", train)
        ckpt = best_checkpoint(run / "fit")
        test = ["--trainer.default_root_dir", str(run / "test"), "--ckpt_path", str(ckpt)]
        self.step(
            f"{branch} {key} test", run / "test" / "lightning_logs", lambda: self.sh("test", *common, *test)
        )
        val, tested = _scalars(run / "fit"), _scalars(run / "test")
        best_epoch = (
            min(range(len(val["val/loss"])), key=val["val/loss"].__getitem__) if val.get("val/loss") else -1
        )
        row = self.summary.setdefault(key, {})
        for name in METRICS[branch]:
            values = val.get(f"val/{name}", [])
            row[f"{'semantic' if branch == 'semantic' else 'lowlevel'}_val_{name.split('_')[1]}"] = (
                values[best_epoch] if len(values) > best_epoch >= 0 else None
            )
            row[f"{branch}_test_{name}"] = tested.get(f"test/{name}", [None])[-1]
        _add_test_intervals(self.summary, self.out, branch, key)
        return ckpt

    def _stage2(self, store: Path, semantic: Path, unclip: Path | None) -> Path:
        """Stage 2: the semantic BIT and the tiny unCLIP UNet fine-tuned together (the demo's adapted CLIP)."""
        run = self.out / "stage2" / "fit"
        pretrained = ["--model.init_args.unclip", str(unclip), "--model.init_args.image_size", "64"]

        def fit() -> None:
            self.sh("fit", "--config", str(packaged_config("sim/stage2_demo")), "--data.store", str(store),
                    "--model.init_args.bit_checkpoint", str(semantic), "--trainer.default_root_dir", str(run),
                    "--trainer.max_epochs", str(self.args.stage2_epochs), *(pretrained if unclip else []))  # fmt: skip
            (run / "done").write_text("ok\n")

        self.step("stage 2", run / "done", fit)
        return best_checkpoint(run)

    def _reconstruct(
        self, store: Path, lowlevel: Path, stage2: Path, semantic: Path, unclip: Path | None
    ) -> None:
        folder = self.out / "reconstruct"
        a = self.args
        stock = ["--unclip", str(unclip)] if unclip else []
        # No --overwrite: an interrupted reconstruct run resumes where it stopped.
        self.step("reconstruct", folder / "metrics_semantic" / "metrics.json", lambda: self.sh(
            "reconstruct", "--store", str(store), "--out", str(folder), "--lowlevel", str(lowlevel),
            "--stage2", str(stage2), "--semantic-stock", str(semantic), "--tiny-unclip", *stock, "--nets", "tiny",
            "--limit", str(a.recon_images), "--dip-steps", str(a.dip_steps), "--dip-lr", str(a.dip_lr), "--dip-channels", "16",
            "--dip-batch", "8", "--batch-size", "8", "--device", "cpu"))  # fmt: skip
        names = {"lowlevel": "low_level", "semantic": "semantic", "semantic_stock": "semantic_stock"}
        names["refined"] = "refined"
        self.summary["recon"] = {
            names[stage]: stage_metrics(folder / f"metrics_{stage}" / "metrics.json")
            for stage in names
            if (folder / f"metrics_{stage}" / "metrics.json").exists()
        }

    def _linear_baseline(self, store: Path) -> None:
        """The linear pixel decoder (configs/demo.yaml) on the reconstructed images: ``recon.linear_baseline``."""
        from brainit_pl.workflows.baseline import linear_stage

        run, folder = self.out / "linear" / "fit", self.out / "reconstruct"

        def fit() -> None:
            self.sh("fit", "--config", str(packaged_config("demo")), "--data.store", str(store),
                    "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false")  # fmt: skip
            (run / "done").write_text("ok\n")

        self.step("linear baseline", run / "done", fit)
        metrics = folder / "metrics_linear" / "metrics.json"
        self.step(
            "linear baseline scores", metrics, lambda: linear_stage(best_checkpoint(run), store, folder)
        )
        self.summary.setdefault("recon", {})["linear_baseline"] = stage_metrics(metrics)

    def _report(self, store: Path) -> None:
        from brainit_pl.metrics.html import reconstruction_report

        report = self.out / "report"
        report.mkdir(exist_ok=True)
        recon = self.out / "reconstruct"
        for name, source in (
            ("reconstructions.png", recon / "reconstructions.png"),
            ("clusters.png", self.out / "v2c_functional" / "clusters_subj01.png"),
        ):
            if source.exists():
                shutil.copyfile(source, report / name)
        for suffix in (
            "md",
            "json",
        ):  # the final stage's report (semantic) as metrics.*; each stage beside it
            for stage in ("lowlevel", "semantic", "semantic_stock"):
                src = recon / f"metrics_{stage}" / f"metrics.{suffix}"
                if src.exists():
                    shutil.copyfile(src, report / f"metrics_{stage}.{suffix}")
            if (recon / "metrics_semantic" / f"metrics.{suffix}").exists():
                shutil.copyfile(
                    recon / "metrics_semantic" / f"metrics.{suffix}", report / f"metrics.{suffix}"
                )
        self.summary["noise_ceiling"] = _mean_noise_ceiling(store)
        a = self.args
        self.summary["cpu_reductions"] = {  # what this CPU demo runs instead of the paper's settings
            "dip_steps": f"{a.dip_steps} at lr {a.dip_lr} (the method: 1800 at lr 1e-3)",
            "dip_channels": "16 (the method: 128)",
            "recon_images": f"{a.recon_images} shared test images per subject (the method: all)",
            "stage2_epochs": f"{a.stage2_epochs} (the paper: 10), tiny unCLIP UNet and VAE at 64² (the method: 256²)",
            "unclip": f"the tiny twin pretrained {a.unclip_epochs} epochs on the training stimuli "
            "(the method: MindEye2's unclip6)"
            if a.unclip_epochs > 0
            else "the random tiny twin",
            "networks": "tiny twins: CLIP, VGG16-BN (slim), unCLIP, metric networks (random weights)",
            "unchanged": "unCLIP 36 Euler steps from step 14 of 50, CFG 5 with noise tokens, contrast 0.8",
        }
        self.summary["report"] = str(report)
        atomic_write_text(report / "summary.json", json.dumps(self.summary, indent=2) + "\n")
        reconstruction_report(recon, report / "report.html", title="brainit-pl demo", summary=self.summary,
                              figures=[report / "clusters.png", *sorted(self.out.glob("nsd/simulation/preview_*.png")),
                                       *sorted(self.out.glob("encoder/**/brain_maps/*.png"))])  # fmt: skip
        print(f"total: {sum(self.summary['timings_s'].values()):.1f} s of steps run now")
        print(f"report: {report} (open report.html)")


# ------------------------------------------------------------------------------------------- helpers
def stage_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json's means over subjects, each with its 95 % bootstrap interval as ``<metric>_ci``."""
    results = json.loads(path.read_text())
    return {**results["mean"], **results.get("mean_ci", {})}


# (system a, system b) of the reconstruction claims: the paper's stage 2 against its ablation, and the
# low-level images against the linear pixel decoder (the folders' metrics_<stage>/per_image.csv).
RECON_PAIRS = (("semantic", "semantic_stock"), ("lowlevel", "linear"))
LOWER_IS_BETTER = ("effnet", "swav")


def recon_comparisons(folder: Path) -> dict[str, dict[str, Any]]:
    """:data:`RECON_PAIRS` per metric on the images both scored (:func:`~brainit_pl.metrics.compare.compare_scores`):
    ``a − b`` with its paired-bootstrap interval and the verdict, and each stage's mean with its interval."""
    import pandas as pd

    from brainit_pl.metrics.compare import compare_scores

    out: dict[str, dict[str, Any]] = {}
    for a, b in RECON_PAIRS:
        files = [folder / f"metrics_{s}" / "per_image.csv" for s in (a, b)]
        if not all(f.exists() for f in files):
            continue
        merged = pd.read_csv(files[0]).merge(
            pd.read_csv(files[1]), on=["subject", "image"], suffixes=("_a", "_b")
        )
        rows = {}
        for metric in (c[:-2] for c in merged.columns if c.endswith("_a")):
            pair = merged[["subject", "image", f"{metric}_a", f"{metric}_b"]].dropna()
            if len(pair):
                keyed = [dict(zip(zip(pair["subject"], pair["image"]), pair[f"{metric}_{x}"])) for x in "ab"]
                rows[metric] = compare_scores(*keyed, higher_is_better=metric not in LOWER_IS_BETTER)
        out[f"{a}_vs_{b}"] = rows
    return out


def best_checkpoint(run: Path) -> Path:
    """A fit folder's checkpoint as the demo picks it (also for transfer-demo): the best-validation one, else ``last.ckpt``."""
    best = sorted(p for p in run.rglob("*.ckpt") if p.name != "last.ckpt")
    found = best or sorted(run.rglob("last.ckpt"))
    require(bool(found), f"{run} holds no checkpoint: delete the folder to train it again")
    return found[-1]


def _add_test_intervals(summary: dict[str, Any], out: Path, branch: str, key: str) -> None:
    """Add to ``summary`` the 95 % bootstrap interval over test images of each of ``key``'s test metrics
    (``<branch>_test_<metric>_ci``) and, for a model other than the BIT, its paired comparison with the
    BIT in ``comparisons[<branch>_<metric>]["bit_vs_<key>"]``: difference (BIT − model), its interval and
    the verdict for the BIT (``"tie"`` when the interval contains 0). From the runs' ``test_scores.csv``;
    a run tested before those files existed gets ``None`` intervals and no comparison."""
    from brainit_pl.metrics.compare import compare_scores, find_test_scores, mean_with_ci, read_test_scores

    def scores(model: str) -> dict[str, Any]:
        path = find_test_scores(out / branch / model / "test")
        return read_test_scores(path) if path is not None else {}

    mine, bit = scores(key), scores("bit") if key != "bit" else {}
    for name in METRICS[branch]:
        summary[key][f"{branch}_test_{name}_ci"] = mean_with_ci(mine[name])["ci"] if name in mine else None
        if name in mine and name in bit:
            result = compare_scores(bit[name], mine[name])
            summary.setdefault("comparisons", {}).setdefault(f"{branch}_{name}", {})[f"bit_vs_{key}"] = {
                "diff": result["diff"],
                "ci": result["diff_ci"],
                "verdict": result["verdict"],
                "n_images": result["n_images"],
            }


def _scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.rglob("events.out.tfevents.*"), key=os.path.getmtime)
    if not events:
        return {}
    acc = EventAccumulator(str(events[-1]))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _score_encoder(ckpt: Path, store: Path, out: Path) -> None:
    """Encoder vs ridge on the backbone features, median voxel r over the held-out validation images."""
    from brainit_pl.data.datamodule import NSDDataModule
    from brainit_pl.lit.encoder import EncoderModule
    from brainit_pl.lit.encoder_ridge import ridge_vs_encoder

    module = load_module(EncoderModule, ckpt)
    dm = NSDDataModule(str(store), image_sizes=[224], val_fraction=0.1, batch_size=32)
    dm.setup("fit")
    scores = ridge_vs_encoder(module, dm, ncsnr=None, split="val")
    summary = {
        "val_corr_median": scores["encoder"]["voxel_corr_median"],
        "val_corr_p75": scores["encoder"]["voxel_corr_p75"],
        "ridge_val_corr_median": scores["ridge"]["voxel_corr_median"],
        "ridge_val_corr_p75": scores["ridge"]["voxel_corr_p75"],
    }
    atomic_write_text(out, json.dumps(summary, indent=2) + "\n")


def _simulation_root(store: Path) -> Path | None:
    from brainit_pl.data.store import Store
    from brainit_pl.features.synthesize import simulation_root

    return simulation_root(Store(store))


def _mean_noise_ceiling(store: Path) -> float | None:
    """Mean over all voxels of NC = ncsnr² / (ncsnr² + 1/3): the explainable variance of 3-repeat averages."""
    import numpy as np

    from brainit_pl.data.store import Store

    opened = Store(store)
    parts = [opened.subject(s).ncsnr for s in opened.subjects]
    if any(p is None for p in parts):
        return None
    snr2 = np.concatenate(parts).astype(np.float64) ** 2
    return float((snr2 / (snr2 + 1 / 3)).mean())
