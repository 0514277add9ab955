"""The BIT LightningModule through the real CLI: both branches, resume, DDP, bf16, and every refusal."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brainit_pl.cli import main
from brainit_pl.lit.schedule import CubicWarmupPlateau, warmup_factor
from brainit_pl.models.v2c import ClusterMap, save_clusters
from test_fit import DIST_VARS

CONFIG = str(Path(__file__).parents[1] / "configs" / "sim" / "bit_tiny.yaml")
LOWLEVEL = (
    *("--model.init_args.branch", "lowlevel", "--model.init_args.tiny_vgg", "true"),
    *("--model.init_args.target_shape", "null", "--model.init_args.tokens_per_scale", "[8,8,4,4,2]"),
    *("--data.features", "[]", "--data.image_sizes", "[112]"),
)


def _args(store, root, *extra, command="fit"):
    return [
        command,
        *("--config", CONFIG, "--data.store", str(store)),
        *("--model.init_args.clusters", str(Path(store) / "clusters.npz")),
        *("--trainer.default_root_dir", str(root)),
        *extra,
    ]


def _process(store, root, *extra, **kwargs):
    """``brainit-pl fit`` in a real process, without inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "brainit_pl.cli", *_args(store, root, *extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, **kwargs)


def _scalars(root) -> dict[str, list[float]]:
    (events,) = Path(root).rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _error_line(stderr_lines) -> str:
    """The one error line of a refused command, last on stderr.

    Lightning's own log lines may precede it (in-process, under pytest's capture, even a "Logging error"
    from its handler bound to an earlier test's stream); test_fit checks the whole stderr in a subprocess.
    """
    lines = stderr_lines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


def _ckpt(root, name="last.ckpt"):
    (path,) = Path(root).rglob(name)
    return torch.load(path, map_location="cpu", weights_only=False)


def test_semantic_fit_then_test(bit_store, tmp_path, capsys):
    assert main(_args(bit_store, tmp_path / "fit")) == 0
    logged = _scalars(tmp_path / "fit")
    assert len(logged["val/loss"]) == 2 and len(logged["val/clip_cos"]) == len(logged["val/clip_2way"]) == 2
    assert logged["val/loss"][-1] < logged["val/loss"][0]  # it learns
    assert logged["val/clip_cos"][-1] > logged["val/clip_cos"][0]
    ckpt = _ckpt(tmp_path / "fit")
    assert not any(k.startswith("vgg") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["n_voxels"] == {1: 367, 2: 356}
    assert len(ckpt["brainit_bit"]["clusters_sha1"]) == 40

    ckpt_path = next((tmp_path / "fit").rglob("last.ckpt"))
    assert main(_args(bit_store, tmp_path / "test", "--ckpt_path", str(ckpt_path), command="test")) == 0
    assert "test/clip_cos" in capsys.readouterr().out


def test_lowlevel_fit_logs_two_way(bit_store, tmp_path):
    extra = (*LOWLEVEL, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert main(_args(bit_store, tmp_path, *extra)) == 0
    logged = _scalars(tmp_path)
    assert np.isfinite(logged["train/loss"]).all() and 0 <= logged["val/vgg_2way"][0] <= 1
    ckpt = _ckpt(tmp_path)
    assert not any("vgg" in k for k in ckpt["state_dict"])  # the frozen VGG is never saved
    assert ckpt["state_dict"]["net.pred_tokens"].shape == (7190, 16)


@pytest.mark.parametrize("positions", ["per_image", "shared"])
def test_position_draws(positions):
    from brainit_pl.lit.bit import BITModule

    module = BITModule(
        {1: 10, 2: 12}, branch="lowlevel", decoder="mindeye2", tiny_vgg=True, dim=16,
        tokens_per_scale=[8, 8, 4, 4, 2], positions=positions,
    )  # fmt: skip
    ids, sizes = module._positions(batch_size=3, key=7)  # (B, Q)
    assert ids.shape == (3, 26) and sizes == [8, 8, 4, 4, 2]
    assert torch.equal(ids, module._positions(3, key=7)[0])  # keyed: the same draw again
    starts = np.cumsum([0, *module.vgg_tokens.layout.counts])
    for row in ids:  # n distinct positions of each scale, inside that scale
        for (lo, hi), part in zip(zip(starts[:-1], starts[1:]), row.split(sizes)):
            assert len(set(part.tolist())) == len(part) and ((part >= lo) & (part < hi)).all()
    same = all(torch.equal(ids[0], row) for row in ids)
    assert same == (positions == "shared")


def test_resume_continues_exactly(bit_store, tmp_path):
    # Straight 4 epochs vs 2 + resume to 4: the warm-up (2 epochs) ends inside the first half.
    extra = ("--model.init_args.warmup_epochs", "2", "--model.init_args.lr_patience", "0")
    assert main(_args(bit_store, tmp_path / "straight", *extra, "--trainer.max_epochs", "4")) == 0
    assert main(_args(bit_store, tmp_path / "half", *extra)) == 0
    half = next((tmp_path / "half").rglob("last.ckpt"))
    resumed = ("--trainer.max_epochs", "4", "--ckpt_path", str(half))
    assert main(_args(bit_store, tmp_path / "resumed", *extra, *resumed)) == 0
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 16 and a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["lr_schedulers"][0]["last_epoch"] == 4
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in state_a:
        torch.testing.assert_close(state_b[i]["exp_avg_sq"], state_a[i]["exp_avg_sq"], rtol=0, atol=0)


def test_ddp_matches_single_process(bit_store, tmp_path):
    # DDP: 2 ranks × batch 4 = the single process's batch 8 per step (same samples per epoch).
    common = ("--trainer.max_epochs", "3", "--model.init_args.warmup_epochs", "0")
    single = _process(bit_store, tmp_path / "single", *common, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size", "4")
    proc = _process(bit_store, tmp_path / "ddp", *common, *ddp, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _scalars(tmp_path / "single"), _scalars(tmp_path / "ddp")
    assert len(a["train/loss"]) == len(b["train/loss"]) == 12  # same number of optimizer steps
    # The groupings and voxel draws differ (batches are keyed by their own number), so the curves agree
    # within the noise of the draws, not bit for bit.
    np.testing.assert_allclose(b["val/loss"], a["val/loss"], rtol=0.05)
    np.testing.assert_allclose(np.mean(b["train/loss"]), np.mean(a["train/loss"]), rtol=0.05)
    assert b["val/loss"][-1] < b["val/loss"][0]


def test_bf16_mixed(bit_store, tmp_path):
    extra = ("--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1")
    assert main(_args(bit_store, tmp_path, *extra)) == 0
    assert np.isfinite(_scalars(tmp_path)["train/loss"]).all()


def test_nan_loss_stops_with_step_and_batch(bit_store, tmp_path, stderr_lines):
    # An absurd learning rate: the first update overflows the weights, the second step's loss is NaN.
    extra = ("--model.init_args.lr", "1e30", "--model.init_args.warmup_epochs", "0")
    code = main(_args(bit_store, tmp_path, *extra))
    assert code == 2
    line = _error_line(stderr_lines)
    assert "non-finite training loss" in line and "global step 1" in line and "batch 1" in line


def _write_clusters(path, n_voxels, k=4):
    labels = np.zeros(sum(n_voxels.values()), dtype=np.int64) + np.arange(sum(n_voxels.values())) % k
    save_clusters(path, ClusterMap(labels, n_voxels, k, "random", 0))
    return str(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data.subjects", "[9]"), "subject(s) [9] not in the store"),
        (("--model.init_args.n_clusters", "7"), "K=4 clusters but the config says n_clusters=7"),
        (("--data.features", "[]"), "set data.features: [clip]"),
        (("--model.init_args.target_shape", "[256,64]"), "set model.init_args.target_shape: [256, 32]"),
        (("--model.init_args.clusters", "null"), "the BIT needs its V2C clusters"),
    ],
)
def test_bad_config_is_one_line(bit_store, tmp_path, stderr_lines, extra, message):
    assert main(_args(bit_store, tmp_path, *extra)) == 2
    line = _error_line(stderr_lines)
    assert message in line


def test_clusters_of_other_voxels_refused(bit_store, tmp_path, stderr_lines):
    other = _write_clusters(tmp_path / "c.npz", {1: 367, 2: 300})
    assert main(_args(bit_store, tmp_path / "run", "--model.init_args.clusters", other)) == 2
    line = _error_line(stderr_lines)
    assert "voxel counts {1: 367, 2: 300}" in line and "re-run `brainit-pl cluster`" in line


def test_checkpoint_of_another_config_refused(bit_store, tmp_path, capsys):
    clusters = _write_clusters(tmp_path / "c.npz", {1: 367, 2: 356})
    extra = ("--trainer.max_epochs", "1", "--model.init_args.clusters", clusters)
    assert main(_args(bit_store, tmp_path / "a", *extra)) == 0
    ckpt = str(next((tmp_path / "a").rglob("last.ckpt")))
    # Lightning rebuilds the model from the checkpoint's hyperparameters: a changed width is replaced
    # (with a warning), but data the checkpoint does not fit is refused.
    args = _args(bit_store, tmp_path / "b", "--model.init_args.dim", "8", "--ckpt_path", ckpt, command="test")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "dim: 8 -> 16" in err, err[-2000:]
    assert (
        main(_args(bit_store, tmp_path / "c", "--data.subjects", "[1]", "--ckpt_path", ckpt, command="test"))
        == 2
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "another configuration" in line and "n_voxels: checkpoint {1: 367, 2: 356} vs config {1: 367}" in line
    )
    _write_clusters(clusters, {1: 367, 2: 356}, k=3)  # `brainit-pl cluster` re-run into the same file
    assert main(_args(bit_store, tmp_path / "d", "--ckpt_path", ckpt, command="test")) == 2
    assert "clusters file sha1" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cubic_warmup_then_plateau():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = CubicWarmupPlateau(opt, warmup_epochs=3, start_factor=1e-3, patience=0, factor=0.1)
    rates = [opt.param_groups[0]["lr"]]
    for loss in (5.0, 4.0, 3.0, 2.0, 2.5, 1.0):  # the metric is ignored during the warm-up
        sched.step(loss)
        rates.append(opt.param_groups[0]["lr"])
    expected = [warmup_factor(e, 3, 1e-3) for e in range(3)] + [1.0, 1.0, 0.1, 0.1]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    assert rates[1] == pytest.approx(1e-3 + 0.999 / 27)
    # The state round-trips (what a resumed run restores).
    again = CubicWarmupPlateau(torch.optim.AdamW([param], lr=1.0), warmup_epochs=3, patience=0, factor=0.1)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == sched.last_epoch and again.best == sched.best
