"""``brainit-pl test`` of the trained Brain-IT (BrainITModule + ReconstructionCallback): the paper's chain,
scored per stage, in one process and under DDP (2 CPU processes), resumable and refusing other runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainit_pl.cli import main
from brainit_pl.metrics.html import GALLERY_IMAGES
from test_fit import DIST_VARS

CONFIG = str(Path(__file__).parents[1] / "configs" / "sim" / "test_tiny.yaml")
SHARED = 10  # shared test images per subject in the tiny preset


def _args(store, root, ckpts, *extra):
    return [
        "test",
        *("--config", CONFIG, "--data.store", str(store), "--trainer.default_root_dir", str(root)),
        *("--model.init_args.lowlevel", str(ckpts.lowlevel), "--model.init_args.stage2", str(ckpts.stage2)),
        *extra,
    ]


def _out(root) -> Path:
    (out,) = Path(root).rglob("reconstruct")
    return out


def test_test_reconstructs_with_the_stage2_model(bit_store, checkpoints, tmp_path, read_report):
    stock = ("--model.init_args.semantic_stock", str(checkpoints.semantic))
    assert main(_args(bit_store, tmp_path / "t", checkpoints, *stock)) == 0
    out = _out(tmp_path / "t")
    for subject in ("subj01", "subj02"):
        for stage in ("lowlevel", "semantic", "semantic_stock"):
            assert len(list((out / subject / stage).glob("*.png"))) == SHARED
    for stage in ("lowlevel", "semantic", "semantic_stock"):
        results = json.loads((out / f"metrics_{stage}" / "metrics.json").read_text())
        assert set(results["per_subject"]) == {"subj01", "subj02"}
    assert json.loads((out / "run.json").read_text())["finished"] is True
    shown = min(SHARED, GALLERY_IMAGES)  # the first images of each subject, ground truth + 3 stages
    assert read_report(out / "report.html")[1] == 2 * shown * 4
    from test_bit_lit import _scalars

    logged = _scalars(tmp_path / "t")
    assert "test_semantic/pixcorr" in logged and "test_lowlevel/pixcorr" in logged


def test_test_refuses_a_table_of_other_data_and_a_missing_callback(
    bit_store, checkpoints, tmp_path, stderr_lines
):
    argv = _args(bit_store, tmp_path / "a", checkpoints, "--data.subjects", "[1]")
    assert main(argv) == 2
    assert "the checkpoints were trained on" in stderr_lines()[-1]
    no_callback = _args(bit_store, tmp_path / "b", checkpoints, "--trainer.callbacks", "[]")
    assert main(no_callback) == 2
    assert "reconstructs through the ReconstructionCallback" in stderr_lines()[-1]


def test_resume_redoes_nothing_and_refuses_a_finished_run(bit_store, checkpoints, tmp_path, stderr_lines):
    fixed = tmp_path / "fixed"
    cb = tmp_path / "cb.yaml"
    cb.write_text(
        "trainer:\n  callbacks:\n    - class_path: brainit_pl.recon.callback.ReconstructionCallback\n"
        f"      init_args: {{every_n_epochs: 0, test_dip_steps: 3, dip_channels: 16, nets: none, out_dir: {fixed}}}\n"
    )
    argv = [*_args(bit_store, tmp_path / "r1", checkpoints), "--config", str(cb)]
    assert main(argv) == 0
    kept = sorted((fixed / "subj01" / "semantic").glob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in kept}
    assert main([*_args(bit_store, tmp_path / "r2", checkpoints), "--config", str(cb)]) == 2
    assert "already holds a finished reconstruction" in stderr_lines()[-1]

    settings = json.loads((fixed / "run.json").read_text())  # an interrupted run: one image lost
    del settings["finished"]
    (fixed / "run.json").write_text(json.dumps(settings))
    kept[0].unlink()
    assert main([*_args(bit_store, tmp_path / "r3", checkpoints), "--config", str(cb)]) == 0
    assert kept[0].is_file() and all(p.stat().st_mtime_ns == t for p, t in before.items() if p != kept[0])

    settings["seed"] = 5  # an interrupted run of other settings
    (fixed / "run.json").write_text(json.dumps(settings))
    assert main([*_args(bit_store, tmp_path / "r4", checkpoints), "--config", str(cb)]) == 2
    assert "other settings" in stderr_lines()[-1]


@pytest.mark.slow
def test_test_under_ddp_matches_one_process(bit_store, checkpoints, tmp_path):
    """2 CPU processes (gloo): each reconstructs its shard, rank 0 scores all; the images equal one process's."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    cmd = [sys.executable, "-m", "brainit_pl.cli", *_args(bit_store, tmp_path / "ddp", checkpoints, *ddp)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(_args(bit_store, tmp_path / "one", checkpoints)) == 0
    a, b = _out(tmp_path / "ddp"), _out(tmp_path / "one")
    for subject in ("subj01", "subj02"):
        for stage in ("lowlevel", "semantic"):
            x, y = (np.load(o / subject / f"{stage}.npz") for o in (a, b))
            assert np.array_equal(x["nsd_id"], y["nsd_id"]) and len(x["nsd_id"]) == SHARED
            assert np.abs(x["images"].astype(int) - y["images"].astype(int)).max() <= 1
    assert json.loads((a / "metrics_semantic" / "metrics.json").read_text())["per_subject"].keys() == {
        "subj01",
        "subj02",
    }
