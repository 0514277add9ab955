"""End to end through the real CLI: simulate → prepare → fit → checkpoint → resume → test, and DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from brainit_pl.cli import main

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
# Variables a parent launcher may have set; a child run must not inherit them.
DIST_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
)


def _fit_args(store, root, *extra):
    return [
        "fit",
        "--config",
        TINY,
        "--data.store",
        str(store),
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def _fit(store, root, *extra):
    return main(_fit_args(store, root, *extra))


def _fit_process(store, root, *extra, **kwargs):
    """``brainit-pl fit`` in a real process, without inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "brainit_pl.cli", *_fit_args(store, root, *extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, **kwargs)


def test_fit_resume_test(tiny_store, tmp_path, capsys):
    assert _fit(tiny_store, tmp_path / "a") == 0
    ckpts = sorted((tmp_path / "a").rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    first = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    assert first["epoch"] == 1  # max_epochs 2, 0-based

    # Resume for one more epoch into a fresh folder (LightningCLI refuses to overwrite its saved config).
    assert _fit(tiny_store, tmp_path / "b", "--trainer.max_epochs", "3", "--ckpt_path", str(ckpts[-1])) == 0
    resumed = sorted((tmp_path / "b").rglob("*.ckpt"))
    last = torch.load(resumed[-1], map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] > first["global_step"]

    code = main(
        [
            "test",
            "--config",
            TINY,
            "--data.store",
            str(tiny_store),
            "--trainer.default_root_dir",
            str(tmp_path / "c"),
            "--ckpt_path",
            str(resumed[-1]),
        ]
    )
    assert code == 0
    assert "test/pixcorr" in capsys.readouterr().out
    # TestEvaluation scored the reconstructions of the shared images, per subject.
    (report,) = (tmp_path / "c").rglob("metrics.json")
    results = json.loads(report.read_text())
    assert results["protocol"] == "mindeye2" and set(results["per_subject"]) == {"subj01", "subj02"}
    assert results["n_images"] == 10  # the tiny preset's shared images
    assert -1 <= results["mean"]["pixcorr"] <= 1 and 0 <= results["mean"]["alexnet2"] <= 1
    assert {p.name for p in report.parent.iterdir()} >= {
        "metrics.md", "metrics.csv", "recon_grid_subj01.png", "recon_grid_subj02.png",
    }  # fmt: skip


def test_missing_store_is_one_line(tmp_path):
    # A real process: what a user sees on the terminal (pytest's capture would mix in Lightning's logs).
    proc = _fit_process(tmp_path / "nowhere", tmp_path / "run", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "manifest.json" in errors[0]


def test_ddp_two_cpu_processes(tiny_store, tmp_path):
    proc = _fit_process(
        tiny_store,
        tmp_path,
        *("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1"),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stderr or "MEMBER: 2/2" in proc.stderr, proc.stderr[-3000:]
    assert list(tmp_path.rglob("*.ckpt"))
