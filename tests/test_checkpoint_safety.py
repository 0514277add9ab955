"""No checkpoint runs code: every file a user passes is read with ``weights_only`` (issue #19, item 1)."""

import argparse
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.files import load_checkpoint, trusting_checkpoints

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


class _Marker:
    """Unpickled, it creates ``path``: what a crafted checkpoint could do instead (run any code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that looks like ours (state_dict, n_voxels) and creates a marker file when unpickled."""
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"n_voxels": {1: 3}}, "x": _Marker(marker)}, path)
    return path, marker


def _plain(tmp_path: Path) -> Path:
    """A harmless checkpoint with the keys our readers look for first (the other inputs of a command)."""
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"n_voxels": {1: 3}}}, path)
    return path


def _commands(store: Path, bad: Path, ok: Path, out: Path) -> dict[str, list[str]]:
    clusters = str(store / "clusters.npz")
    transfer = [
        *("transfer", "--store", str(store), "--subject", "2", "--clusters", clusters),
        *("--out", str(out / "transfer")),
    ]
    return {
        "cluster --embeddings": [
            "cluster",
            "--embeddings",
            str(bad),
            "--store",
            str(store),
            "--out",
            str(out),
        ],
        "synthesize-fmri --checkpoint": [
            *("synthesize-fmri", "--checkpoint", str(bad), "--store", str(store)),
            *("--out", str(out / "synthetic"), "--n-images", "4"),
        ],
        "reconstruct --lowlevel": [
            *("reconstruct", "--store", str(store), "--out", str(out / "recon"), "--lowlevel", str(bad)),
            *("--nets", "tiny"),
        ],
        "reconstruct --stage2": [
            *("reconstruct", "--store", str(store), "--out", str(out / "recon"), "--stage2", str(bad)),
            *("--nets", "tiny"),
        ],
        "transfer --encoder": [
            *transfer,
            "--encoder",
            str(bad),
            "--semantic",
            str(ok),
            "--lowlevel",
            str(ok),
        ],
        "transfer --semantic": [
            *transfer,
            "--encoder",
            str(ok),
            "--semantic",
            str(bad),
            "--lowlevel",
            str(ok),
        ],
        "fit --ckpt_path": [
            *("fit", "--config", TINY, "--data.store", str(store)),
            *("--trainer.default_root_dir", str(out / "fit"), "--ckpt_path", str(bad)),
        ],
        "test --ckpt_path": [
            *("test", "--config", TINY, "--data.store", str(store)),
            *("--trainer.default_root_dir", str(out / "test"), "--ckpt_path", str(bad)),
        ],
    }


COMMANDS = list(_commands(Path("s"), Path("b"), Path("o"), Path("x")))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(command, bit_store, tmp_path, stderr_lines):
    bad, marker = _crafted(tmp_path)
    argv = _commands(bit_store, bad, _plain(tmp_path), tmp_path / "out")[command]
    stderr_lines()
    assert main(argv) == 2
    assert not marker.exists(), f"{command} unpickled the crafted file"
    lines = stderr_lines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert str(bad) in errors[0] and "--trust-checkpoint" in errors[0]


def test_trust_checkpoint_unpickles_fully(bit_store, tmp_path):
    bad, marker = _crafted(tmp_path)
    argv = _commands(bit_store, bad, _plain(tmp_path), tmp_path / "out")["cluster --embeddings"]
    assert main([*argv, "--trust-checkpoint"]) == 2  # not an encoder checkpoint: refused after reading
    assert marker.exists()  # the user vouched for the file: it was read without restriction


def test_the_allow_list_reads_plain_value_types(tmp_path):
    hparams = {"n_voxels": {1: 3}, "where": pathlib.Path("/a/b"), "ns": argparse.Namespace(k=1)}
    hparams["score"] = np.float64(0.5)
    path = tmp_path / "values.ckpt"
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": hparams, "dt": np.dtype("float32")}, path
    )
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(path, weights_only=True)  # torch's defaults alone refuse these
    ckpt = load_checkpoint(path)
    assert ckpt["hyper_parameters"]["where"] == pathlib.Path("/a/b") and ckpt["dt"] == np.float32
    assert float(ckpt["hyper_parameters"]["score"]) == 0.5


def test_refusal_names_the_file_and_trust_is_scoped(tmp_path):
    bad, marker = _crafted(tmp_path)
    with pytest.raises(BrainITError, match="crafted.ckpt refused"):
        load_checkpoint(bad)
    assert not marker.exists()
    with trusting_checkpoints():
        load_checkpoint(bad)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(BrainITError):
        load_checkpoint(bad)  # the trust ended with its block
    assert not marker.exists()


def test_every_module_checkpoint_reads_with_weights_only(checkpoints):
    """Real ``fit`` checkpoints (low-level BIT, semantic BIT, stage 2) need nothing beyond the allow-list."""
    from brainit_pl.lit.loading import load_bit, load_stage2

    for path in checkpoints:
        ckpt = load_checkpoint(path)
        assert "state_dict" in ckpt and "n_voxels" in ckpt["hyper_parameters"]
    assert load_bit(checkpoints.lowlevel, "lowlevel", torch.device("cpu")) is not None
    assert load_stage2(checkpoints.stage2, torch.device("cpu")) is not None
