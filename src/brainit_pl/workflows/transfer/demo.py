"""``brainit-pl transfer-demo``: a new subject from 1 hour of data, on the simulated demo NSD, in one report.

Holds out subject S (``--subject``, default the store's last) and decodes it four ways, scored alike:

1. **base models without S** (``OUT/base/``): the Universal Encoder (``configs/encoder_demo.yaml``), the
   functional V2C clusters, the semantic and low-level BITs (``configs/sim/bit_*.yaml``), each trained with
   ``--data.subjects`` = the other subjects; with ``--base-external-ratio R`` > 0 also synthetic fMRI of
   ``--n-external`` images for them, mixed R : 1 into the BITs' training (the method's and the default: 3;
   0 turns the external images off, which saves ~6 min of the low-level BIT's training but leaves base
   models weaker than ``make demo``'s: the transfer then lands further from the all-data model);
2. ``transfer``: ``brainit-pl transfer --init nn`` from the base models with S's first ``--hours`` of data
   (stage 2 off: the tiny unCLIP is random, there is nothing to adapt to); ``transfer_random_init``: the same
   with ``--init random`` (its encoder, V2C and synthetic steps do not depend on the init: the NN run's are
   linked, not redone);
3. ``scratch``: the same BIT architectures trained on S's same hours only. Its clusters are the transfer's
   nearest-neighbour clusters of S's voxels: an hour is too little to train an encoder to cluster from, and
   with the same clusters only the training differs. It trains as many optimizer steps as the transfer
   (``--scratch-epochs``, default 4 × ``--transfer-epochs``: a transfer epoch holds 3 synthetic samples per
   real one, a scratch epoch the real ones only);
4. ``all_data``: S trained with all its data next to every other subject: ``make demo``'s BITs, read from
   ``--all-data`` (runs/demo) when it has them, else trained in ``OUT/all_data/demo`` by the demo pipeline
   (``brainit-pl demo``) with this command's epochs (and, with ``--base-external-ratio 0``, no external
   images: then it differs from the base models by S's data only);
5. every variant reconstructs the same first ``--recon-images`` shared images of S (low-level BIT → DIP,
   semantic BIT → the tiny unCLIP, the same options) and is scored on held-out feature prediction:
   ``semantic_val_cos``, ``semantic_val_2way``, ``lowlevel_val_2way`` (the demo's metrics, from each BIT's
   test step) on S's shared test images, which no variant trained on — their own validation splits differ
   (a slice of the hour; a slice of all sessions that overlaps the hour), so none of them compares;
6. the report ``OUT/report/``: ``summary.json`` (``noise_ceiling`` of S's voxels, ``transfer.{hours, transfer,
   transfer_random_init, scratch, all_data, ratios}``, ``v2c``, ``timings_s``), ``metrics.md`` and
   ``metrics.json`` (the variants side by side; the ratios transfer / all data and transfer / scratch),
   ``reconstructions.png`` (ground truth, then each variant's stages), ``clusters.png`` (S's clusters).

Every step is skipped when its output exists (seconds per step persist in ``OUT/timings.json``); command
output goes to ``OUT/log.txt``. Tiny twins on a simulated brain: the numbers test the method's claims (a
1-hour transfer beats scratch and nears all data), they are not NSD results. The base models train at least as
long as ``make demo``'s all-data models (encoder 6 epochs, BITs 10 at 1 : 3 external; the demo's low-level
BIT: 5 at 1 : 1), so that the transfer / all data ratio measures the hour of data, not a weaker start.

Time (demo store, 2-core VM, the defaults, measured in session 3): base models 10.7 min (encoder 2.2,
synthetic fMRI 1.3, semantic BIT 2.0, low-level BIT 5.2), the NN transfer 3.3 min, its random-init twin
1.6 min, scratch 1.3 min, reconstructions and scores 1.5 min: ~18.5 min, plus ~25 min if ``--all-data``
lacks the models and they are trained here. The method's full settings (``--transfer-epochs 50
--dip-steps 1800``, the real networks) are a GPU job.

examples:
  make transfer-1h  # brainit-pl transfer-demo --store demo/store --subject 4 --hours 1 --out runs/transfer-1h
  brainit-pl transfer-demo --hours 0.5 --out runs/transfer-30min --recon-images 4
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from brainit_pl.errors import require
from brainit_pl.files import atomic_write_text
from brainit_pl.packaged_configs import packaged_config
from brainit_pl.workflows.demo import Demo, _simulation_root, best_checkpoint
from brainit_pl.workflows.transfer.report import FEATURES, VARIANTS
from brainit_pl.workflows.transfer.subject import (
    BRANCHES,
    check_subject,
    check_table,
    demo_checkpoints,
    score_features,
)

SHARED = ("encoder", "v2c", "synthetic")  # the transfer's steps before the BITs
RECON = ("--tiny-unclip", "--dip-channels", "16", "--dip-batch", "8", "--device", "cpu")  # as the demo's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl transfer-demo``."""
    add = parser.add_argument
    add(
        "--store",
        type=Path,
        default=Path("demo/store"),
        help="the prepared simulated store (default: demo/store)",
    )
    add("--subject", type=int, help="the held-out subject S (default: the store's last)")
    add(
        "--hours",
        type=float,
        default=1.0,
        help="S's data for transfer and scratch: first H hours (default: 1)",
    )
    add(
        "--out",
        type=Path,
        default=Path("runs/transfer-1h"),
        help="work and report folder (default: runs/transfer-1h)",
    )
    add(
        "--all-data",
        type=Path,
        default=Path("runs/demo"),
        help="`make demo`'s folder: its BITs (default: runs/demo)",
    )
    add("--no-train-all-data", action="store_true", help="fail if --all-data lacks them, instead of training")
    add("--seed", type=int, default=0, help="(default: 0)")
    add("--clusters", type=int, default=25, help="V2C clusters K of the base models (default: 25)")
    add("--encoder-epochs", type=int, default=6, help="base encoder (as make demo) (default: 6)")
    add("--bit-epochs", type=int, default=10, help="base BITs (default: 10)")
    add(
        "--base-external-ratio",
        type=float,
        default=3.0,
        help="synthetic per real sample, base BITs (default: 3)",
    )
    add(
        "--transfer-encoder-epochs",
        type=int,
        default=30,
        help="S's encoder embeddings (as the paper) (default: 30)",
    )
    add("--transfer-epochs", type=int, default=30, help="S's BIT embeddings (paper: 50) (default: 30)")
    add("--scratch-epochs", type=int, help="scratch BITs (default: 4 × --transfer-epochs: as many steps)")
    add(
        "--n-external", type=int, default=500, help="external images, synthetic fMRI (0: none) (default: 500)"
    )
    add(
        "--val-fraction",
        type=float,
        default=0.1,
        help="S's images of the hours for validation (default: 0.1)",
    )
    add("--recon-images", type=int, default=6, help="S's test images reconstructed per variant (default: 6)")
    add("--dip-steps", type=int, default=100, help="DIP steps per image (default: 100; the method: 1800)")


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl transfer-demo`` with parsed ``args``."""
    TransferDemo(args).run()
    return 0


class TransferDemo(Demo):
    """The steps of the module docstring on :class:`~brainit_pl.workflows.demo.Demo`'s ``step`` / ``sh``.

    Raises:
        BrainITError: S not in the store, or too little of S's data in its first ``hours``
            (:func:`check_subject`); ``--all-data`` without its BITs under ``--no-train-all-data``, or of
            another store.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        counts = {k: getattr(args, k) for k in ("encoder_epochs", "bit_epochs", "transfer_encoder_epochs",
                                                "transfer_epochs", "recon_images", "dip_steps")}  # fmt: skip
        bad = {f"--{k.replace('_', '-')}": v for k, v in counts.items() if v < 1}
        require(not bad, f"these options must be >= 1: {bad}")
        require(args.scratch_epochs is None or args.scratch_epochs >= 1, "--scratch-epochs must be >= 1")
        require(args.n_external >= 0, f"--n-external must be >= 0, got {args.n_external}")
        require(
            args.base_external_ratio >= 0,
            f"--base-external-ratio must be >= 0, got {args.base_external_ratio}",
        )
        super().__init__(args)
        self.timings_file = self.out / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        self.store = args.store.resolve()
        self.subject, self.base_subjects = check_subject(
            self.store, args.subject, args.hours, args.val_fraction, args.seed
        )
        self.all_data = demo_checkpoints(args.all_data)  # checked now, used last
        if self.all_data is not None:
            check_table(self.all_data, self.store, self.subject)
        require(
            self.all_data is not None or not args.no_train_all_data,
            f"--all-data {args.all_data} holds no finished BITs of `make demo` (semantic/bit/fit/done and "
            "lowlevel/bit/fit/done): run `make demo` first, or drop --no-train-all-data to train them",
        )

    def step(self, name: str, done: Path, action) -> None:
        """:meth:`Demo.step`; the seconds of every step that ran are kept in ``OUT/timings.json``."""
        super().step(name, done, action)
        if name in self.summary["timings_s"]:
            self.timings[name] = self.summary["timings_s"][name]
            atomic_write_text(self.timings_file, json.dumps(self.timings, indent=2) + "\n")

    def run(self) -> dict[str, Any]:
        from brainit_pl.workflows.transfer import report as tr

        a, out, s = self.args, self.out, self.subject
        self.step("clip features", self.store / "features_clip.h5",
                  lambda: self.sh("extract-features", "--store", str(self.store), "--tiny"))  # fmt: skip
        base = self.base_models(out / "base")
        models = {}
        for name, init in (("transfer", "nn"), ("transfer_random_init", "random")):
            done = self.transfer(name, out / name, base, a.hours, init, share=out / "transfer")
            models[name] = {b: done / b / f"{b}.ckpt" for b in BRANCHES}
        clusters = out / "transfer" / "v2c" / "clusters.npz"
        epochs = a.scratch_epochs or 4 * a.transfer_epochs
        models["scratch"] = {b: self.fit_model(f"scratch {b} BIT", out / "scratch" / b, "bit", b, [s],
                                               clusters=clusters, epochs=epochs, hours=a.hours)
                             for b in BRANCHES}  # fmt: skip
        models["all_data"] = self.all_data_models(out / "all_data" / "demo")
        variants = {}
        for name in VARIANTS:
            folder = out / name / "reconstruct"
            if name in ("scratch", "all_data"):  # the transfer command reconstructs by itself
                self.reconstruct(name, folder, models[name])
            scores = self.score(name, out / name / "scores.json", models[name])
            variants[name] = tr.variant_record(scores, tr.recon_metrics(folder))
        scoring = (
            f"subject {s}'s shared test images (repeats averaged, all voxels); no variant trains on them"
        )
        summary = tr.build_summary(
            subject=s, hours=a.hours, base_subjects=self.base_subjects, variants=variants, scoring=scoring,
            noise_ceiling=tr.subject_noise_ceiling(self.store, s), timings=self.timings,
            extra={"v2c": self.v2c_scores(out / "base" / "v2c_functional", clusters)},
        )  # fmt: skip
        self.write_report(summary, {VARIANTS[v]: out / v / "reconstruct" for v in VARIANTS}, clusters)
        return summary

    # ---------------------------------------------------------------------------------------- steps
    def base_models(self, folder: Path) -> dict[str, Any]:
        """The models of all subjects but S: ``encoder``, ``clusters``, ``semantic``, ``lowlevel`` (paths).

        Also ``external``: their synthetic-fMRI folder, ``None`` without (``--n-external 0``, or
        ``--base-external-ratio 0``).
        """
        a, store, subjects = self.args, self.store, json.dumps(self.base_subjects)
        enc, v2c, truth = folder / "encoder", folder / "v2c_functional", _simulation_root(self.store)
        self.step("base encoder", enc / "done", lambda: (self.sh(
            "fit", "--config", str(packaged_config("encoder_demo")), "--data.store", str(store),
            "--data.subjects", subjects, "--trainer.default_root_dir", str(enc), "--seed_everything",
            str(a.seed), "--data.seed", str(a.seed), "--trainer.max_epochs", str(a.encoder_epochs),
            "--trainer.enable_progress_bar", "false"), (enc / "done").write_text("ok\n")))  # fmt: skip
        encoder = sorted(enc.rglob("last.ckpt"))[-1]  # as the demo: the last epoch
        truth_args = ["--truth", str(truth)] if truth else []  # + the ARI against the simulator's voxel types
        self.step("base V2C", v2c / "clusters.npz", lambda: self.sh(
            "cluster", "--store", str(store), "--out", str(v2c), "--kind", "functional", "--clusters",
            str(a.clusters), "--embeddings", str(encoder), "--seed", str(a.seed), *truth_args))  # fmt: skip
        external = folder / "synthetic" if a.n_external > 0 and a.base_external_ratio > 0 else None
        if external is not None:
            self.step("base synthetic fMRI", external / "features_clip.h5", lambda: (
                self.sh("synthesize-fmri", "--checkpoint", str(encoder), "--store", str(store), "--out",
                        str(external), "--n-images", str(a.n_external), "--overwrite"),
                self.sh("extract-features", "--store", str(external), "--tiny")))  # fmt: skip
        base = {"encoder": encoder, "clusters": v2c / "clusters.npz", "external": external}
        for b in BRANCHES:
            base[b] = self.fit_model(f"base {b} BIT", folder / b, "bit", b, self.base_subjects,
                                     clusters=base["clusters"], external=external,
                                     epochs=a.bit_epochs)  # fmt: skip
        return base

    def fit_model(self, name: str, run: Path, kind: str, branch: str, subjects: list[int], *,
                  clusters: Path | None = None, external: Path | None = None, epochs: int = 1,
                  hours: float | None = None) -> Path:  # fmt: skip
        """``brainit-pl fit`` of ``configs/sim/<kind>_<branch>.yaml`` on ``subjects``; its best checkpoint.

        Args:
            kind: ``bit``, ``mindeye2`` or ``ridge`` (closed form: ``epochs`` is ignored).
            external: synthetic fMRI mixed ``--base-external-ratio`` : 1 with the real samples.
            hours: the subjects' first hours only, with ``--val-fraction``; ``None``: the config's data.
        """
        a = self.args
        argv = ["fit", "--config", str(packaged_config(f"sim/{kind}_{branch}")), "--data.store"]
        argv += [str(self.store), "--data.subjects", json.dumps(subjects)]
        argv += ["--trainer.default_root_dir", str(run)]
        argv += ["--seed_everything", str(a.seed), "--data.seed", str(a.seed)]
        argv += ["--model.init_args.clusters", str(clusters)] if kind == "bit" else []
        if kind != "ridge":  # a short run warms up over half its epochs at most (the configs: 5 of 10)
            argv += ["--trainer.max_epochs", str(epochs)]
            argv += ["--model.init_args.warmup_epochs", str(min(5, max(1, epochs // 2)))]
        if external is not None and kind != "ridge":
            argv += ["--data.external", str(external), "--data.external_ratio", str(a.base_external_ratio)]
        if hours is not None:
            argv += ["--data.hours", str(hours), "--data.val_fraction", str(a.val_fraction)]

        def fit() -> None:
            self.sh(*argv)
            (run / "done").write_text("ok\n")

        self.step(name, run / "done", fit)
        return best_checkpoint(run)

    def transfer(self, name: str, folder: Path, base: dict[str, Any], hours: float, init: str, *,
                 reconstruct: bool = True, share: Path | None = None, shared_steps: tuple[str, ...] = SHARED,
                 clusters: Path | None = None, bits: dict[str, Path] | None = None) -> Path:  # fmt: skip
        """``brainit-pl transfer`` of S from ``base`` into ``folder`` (done: its ``summary.json``).

        Args:
            reconstruct: reconstruct and score S's images (else one image, one DIP step, unscored: the
                transfer command always ends with its reconstruct step).
            share: a finished transfer of the same S, hours and base encoder whose ``shared_steps`` (which
                depend on neither ``init`` nor the BITs) this one links instead of redoing.
            clusters, bits: other base clusters and BITs (the anatomical ablation) instead of ``base``'s.
        """
        a, bits = self.args, bits or base
        if share is not None and share.resolve() != folder.resolve():
            folder.mkdir(parents=True, exist_ok=True)
            for step in shared_steps:  # finished ones only: `transfer` clears an unfinished step's folder
                if (share / step / "result.json").exists() and not (folder / step).exists():
                    link = os.path.relpath(share / step, folder)  # relative: OUT can move
                    (folder / step).symlink_to(link, target_is_directory=True)
        argv = ["transfer", "--store", str(self.store), "--subject", str(self.subject), "--hours", str(hours)]
        argv += ["--encoder", str(base["encoder"]), "--clusters", str(clusters or base["clusters"])]
        argv += ["--semantic", str(bits["semantic"]), "--lowlevel", str(bits["lowlevel"])]
        argv += ["--out", str(folder), "--seed", str(a.seed)]
        # the CPU settings, not the authors' (all data, last epoch): a validation split picks the best epoch
        argv += ["--val-fraction", str(a.val_fraction), "--keep", "best"]
        argv += ["--init", init, "--external-images", str(a.n_external), "--epochs-stage2", "0", *RECON]
        argv += ["--epochs-encoder", str(a.transfer_encoder_epochs), "--epochs-bit", str(a.transfer_epochs)]
        shown = ["--nets", "tiny", "--limit", str(a.recon_images), "--dip-steps", str(a.dip_steps)]
        argv += shown if reconstruct else ["--nets", "none", "--limit", "1", "--dip-steps", "1"]
        self.step(name, folder / "summary.json", lambda: self.sh(*argv))
        inner = json.loads((folder / "summary.json").read_text()).get("timings_s", {})  # for the report
        self.timings.update({f"{name}: {k}": v for k, v in inner.items() if not (folder / k).is_symlink()})
        return folder

    def all_data_models(self, fallback: Path) -> dict[str, Path]:
        """The all-data BITs: ``--all-data``'s (``make demo``'s), else trained in ``fallback`` by the demo."""
        from brainit_pl.workflows import demo as pipeline

        a = self.args
        if self.all_data is not None:
            print(f"[all data] the BITs of {a.all_data}")
            return self.all_data
        found = demo_checkpoints(fallback)
        if found is None:
            print(f"[all data] none in {a.all_data}: the demo pipeline trains them in {fallback}", flush=True)
            parser = argparse.ArgumentParser()
            pipeline.add_arguments(parser)
            demo = Demo(parser.parse_args([
                "--out", str(fallback), "--store", str(self.store), "--models", "bit", "--no-reconstruct",
                "--encoder-epochs", str(a.encoder_epochs), "--bit-epochs", str(a.bit_epochs), "--clusters",
                str(a.clusters), "--n-external", str(a.n_external if a.base_external_ratio > 0 else 0),
                "--seed", str(a.seed)]))  # fmt: skip
            demo.run()
            self.timings.update({f"all data: {k}": v for k, v in demo.summary["timings_s"].items()})
            found = demo_checkpoints(fallback)
            require(found is not None, f"the demo pipeline left no BIT checkpoints in {fallback}")
        check_table(found, self.store, self.subject)
        return found

    def reconstruct(self, name: str, folder: Path, ckpts: dict[str, Path]) -> None:
        """S's first ``--recon-images`` test images, with the options the transfer command is given."""
        a = self.args
        argv = ["reconstruct", "--store", str(self.store), "--out", str(folder), "--seed", str(a.seed)]
        # no stage 2 in this demo: its semantic images are the stage-1 ablation for every variant alike
        argv += ["--lowlevel", str(ckpts["lowlevel"]), "--semantic-stock", str(ckpts["semantic"]), *RECON]
        argv += ["--nets", "tiny", "--limit", str(a.recon_images), "--dip-steps", str(a.dip_steps)]
        argv += ["--subjects", str(self.subject)]
        self.step(
            f"{name} reconstruct", folder / "metrics_semantic_stock" / "metrics.json", lambda: self.sh(*argv)
        )

    def score(self, name: str, path: Path, ckpts: dict[str, Path], kind: str = "bit") -> dict[str, float]:
        """S's held-out feature prediction (``transfer_report.FEATURES``), kept in ``path``."""

        def compute() -> None:
            metrics: dict[str, float] = {}
            for ckpt in ckpts.values():
                metrics.update(score_features(ckpt, self.store, self.subject, kind))
            found = {k: metrics[v] for k, v in FEATURES.items() if v in metrics}
            atomic_write_text(path, json.dumps(found, indent=2) + "\n")

        self.step(f"{name} scores", path, compute)
        return json.loads(path.read_text())

    def v2c_scores(self, base_v2c: Path, clusters: Path) -> dict[str, Any]:
        """ARI against the simulator's voxel types: the base clusters (pooled), S's nearest-neighbour ones."""
        from brainit_pl.data.store import Store
        from brainit_pl.models.cluster_job import _true_types
        from brainit_pl.models.v2c import cluster_agreement, load_clusters

        out: dict[str, Any] = {}
        if (base_v2c / "agreement.json").exists():
            report = json.loads((base_v2c / "agreement.json").read_text())
            out = {"k": report["n_clusters"], "ari_functional": report["ari"]["pooled"]}
            out["ari_anatomical"] = report["anatomical_baseline_ari"]["pooled"]
        truth = _simulation_root(self.store)
        if truth is not None and clusters.exists():
            types = _true_types(truth, Store(self.store), [self.subject])[self.subject]
            labels = load_clusters(clusters).subject_labels(self.subject)
            out["ari_subject_nearest_neighbour"] = cluster_agreement(labels, types)
        return out

    def write_report(self, summary: dict[str, Any], folders: dict[str, Path], clusters: Path) -> None:
        """``OUT/report/``: metrics.md / .json, reconstructions.png, clusters.png, summary.json; the table."""
        from brainit_pl.data.store import Store
        from brainit_pl.workflows.transfer.report import (
            metrics_json,
            metrics_markdown,
            save_cluster_map,
            save_grid,
        )

        report = self.out / "report"
        report.mkdir(parents=True, exist_ok=True)
        markdown = metrics_markdown(summary, self.args.recon_images)
        atomic_write_text(report / "metrics.md", markdown)
        atomic_write_text(report / "metrics.json", json.dumps(metrics_json(summary), indent=2) + "\n")
        save_grid(report / "reconstructions.png", folders, self.subject)
        save_cluster_map(report / "clusters.png", clusters, Store(self.store), self.subject)
        summary["report"] = str(report)
        atomic_write_text(report / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(
            markdown
            + f"\ntotal: {sum(self.timings.values()):.1f} s of steps (OUT/timings.json)\nreport: {report}"
        )
