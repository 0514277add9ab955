"""Resume loses nothing (issue #19, item 2): a ``fit`` killed mid-epoch and resumed with ``--ckpt_path last``
ends with the weights and the best checkpoint of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from brainit_pl.cli import main
from test_fit import DIST_VARS

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "sim").glob("*.yaml"))


def _config(tmp_path: Path, epochs: int = 4) -> Path:
    """configs/tiny.yaml for ``epochs`` epochs, with the Progress callback (tests/resume_progress.py)."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["max_epochs"] = epochs
    progress = {"class_path": "resume_progress.Progress", "init_args": {"path": str(tmp_path / "progress")}}
    config["trainer"]["callbacks"].append(progress)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _popen(config: Path, store: Path, root: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(HF_HUB_OFFLINE="1", BRAINIT_TEST_BATCH_DELAY=str(delay))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "brainit_pl.cli", "fit", "--config", str(config), "--data.store", str(store)]
    cmd += ["--trainer.default_root_dir", str(root), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _best_state(last: Path) -> tuple[str, float]:
    """The best checkpoint (file name, score) recorded by the monitored ModelCheckpoint in ``last``."""
    callbacks = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    (state,) = [s for k, s in callbacks.items() if "val/loss" in k]
    return Path(state["best_model_path"]).name, float(state["best_model_score"])


@pytest.mark.slow
def test_killed_fit_resumes_to_the_uninterrupted_result(tiny_store, tmp_path):
    config = _config(tmp_path)
    _finish(_popen(config, tiny_store, tmp_path / "straight"))

    root = tmp_path / "killed"
    proc = _popen(config, tiny_store, root, delay=0.3)
    progress = tmp_path / "progress"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        text = progress.read_text().split() if progress.exists() else []
        if len(text) == 2 and int(text[0]) == 2 and int(text[1]) >= 1:  # in the middle of epoch 2
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    (last,) = root.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # written after epoch 1

    _finish(_popen(config, tiny_store, root, "--ckpt_path", "last"))

    (straight,) = (tmp_path / "straight").rglob("last.ckpt")
    (resumed,) = root.rglob("last.ckpt")  # the resumed run kept writing into the interrupted run's folder
    a = torch.load(straight, map_location="cpu", weights_only=True)
    b = torch.load(resumed, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    assert _best_state(resumed) == pytest.approx(_best_state(straight))
    # one best checkpoint, the same epoch as the uninterrupted run's
    best = sorted(p.name for p in root.rglob("epoch=*.ckpt"))
    assert best == sorted(p.name for p in (tmp_path / "straight").rglob("epoch=*.ckpt"))
    assert best == [_best_state(straight)[0]]


def test_nothing_to_resume_is_one_line(tiny_store, tmp_path, stderr_lines):
    argv = ["fit", "--config", str(TINY), "--data.store", str(tiny_store)]
    argv += ["--trainer.default_root_dir", str(tmp_path / "empty"), "--ckpt_path", "last"]
    stderr_lines()
    assert main(argv) == 2
    lines = stderr_lines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and "nothing to resume" in errors[0], lines


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_writes_last_ckpt_every_epoch(config):
    """A monitored ModelCheckpoint rewrites last.ckpt only when its metric improves: every shipped config
    that keeps a best checkpoint also has an unmonitored one that writes last.ckpt after every epoch."""
    callbacks = yaml.safe_load(config.read_text()).get("trainer", {}).get("callbacks") or []
    checkpoints = [c.get("init_args") or {} for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    monitored = [c for c in checkpoints if c.get("monitor")]
    if not monitored:
        return
    for c in monitored:  # a monitored last.ckpt is stale after an epoch without improvement
        assert c.get("save_last") in (None, False, "link"), config
    if all(c.get("save_last") == "link" for c in monitored):
        return  # ridge: one closed-form epoch; last.ckpt is linked at every epoch end
    last = [c for c in checkpoints if not c.get("monitor") and c.get("filename") == "last"]
    assert last and last[0].get("enable_version_counter") is False, config
