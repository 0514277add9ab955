"""Every I/O failure is one line naming the file, exit 2, nothing half-written; no garbage read silently.

A full disk is a real one in a child process: a small ``RLIMIT_FSIZE`` makes a write past it fail with EFBIG
(Python ignores SIGXFSZ), which HDF5, PIL and ``open`` report like ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.recon.reconstruct import _check_claim, finish

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
ENCODER_TINY = str(Path(__file__).parents[1] / "configs" / "encoder_tiny.yaml")


def _cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``brainit-pl ARGS`` in a child process, its files limited to ``fsize`` bytes if given."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "brainit_pl.cli", *args]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, preexec_fn=limit if fsize else None, timeout=300
    )


def _error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (log lines may precede it; no traceback may)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".aside", ".lock"))]


# ------------------------------------------------------------------------------------------- disk full
def test_disk_full_in_prepare_is_one_line_and_leaves_nothing(tiny_nsd, tmp_path):
    out = tmp_path / "store"
    line = _error(_cli("prepare", "--nsd-root", str(tiny_nsd), "--out", str(out), fsize=200_000))
    assert "disk full" in line and f"{out}/images.h5" in line and "re-run" in line
    assert not out.exists()
    _no_temporaries(tmp_path)
    assert _cli("prepare", "--nsd-root", str(tiny_nsd), "--out", str(out)).returncode == 0  # space freed


def test_disk_full_in_extract_features_resumes(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    args = ("extract-features", "--store", str(store), "--tiny", "--batch-size", "8")
    line = _error(_cli(*args, fsize=300_000))  # the empty cache fits, its tokens do not
    assert "disk full" in line and "features_clip.h5.partial" in line
    result = _cli(*args)  # the truncated partial file is started over, without --overwrite
    assert result.returncode == 0, result.stderr[-3000:]
    with h5py.File(store / "features_clip.h5", "r") as h5:
        assert h5["done"][()].all()


def test_read_only_output_is_one_line(tiny_nsd, tmp_path, monkeypatch, stderr_lines):
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert main(["prepare", "--nsd-root", str(tiny_nsd), "--out", str(tmp_path / "store")]) == 2
    [line] = stderr_lines()
    assert f"cannot write {tmp_path}" in line and "Read-only file system" in line and "--out" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_unwritable_output_folder_is_one_line(tiny_nsd, tmp_path, stderr_lines):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    assert main(["prepare", "--nsd-root", str(tiny_nsd), "--out", str(folder / "store")]) == 2
    [line] = stderr_lines()
    assert "cannot write" in line and str(folder) in line


def test_io_error_message_names_the_final_file():
    from brainit_pl.errors import io_error_message

    h5 = OSError(
        "Driver write request failed (file write failed: time = now, filename = "
        "'/o/.store.ab_cd123.tmp/.images.h5.x1y2z3w4.tmp', file descriptor = 4, errno = 28, error message = "
        "'No space left on device')"
    )
    assert io_error_message(h5).startswith(
        "disk full (or file size limit reached) while writing /o/store/images.h5:"
    )
    assert "cannot write /x" in io_error_message(PermissionError(errno.EACCES, "denied", "/x"))
    assert io_error_message(OSError(errno.EINVAL, "bad")) is None  # a bug keeps its traceback


def test_torch_save_to_a_full_disk_is_one_line(tmp_path):
    """``torch.save`` into an open file (as transfer writes semantic.ckpt) raises a RuntimeError whose context
    is the OSError (or the OSError itself): that is the one line."""
    import torch

    from brainit_pl.cli import _user_message

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with open(tmp_path / "x.ckpt", "wb") as f, pytest.raises((RuntimeError, OSError)) as raised:
        f.write = full
        torch.save(torch.zeros(1000), f)
    assert _user_message(raised.value).startswith("disk full")


# ------------------------------------------------------------------------------------------- damaged inputs
def test_truncated_image_store_is_one_line(tiny_store, tmp_path, stderr_lines):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    os.truncate(store / "images.h5", 5_000_000)
    assert main(["extract-features", "--store", str(store), "--tiny"]) == 2
    [line] = stderr_lines()
    assert f"{store}/images.h5 is not a readable HDF5 file" in line and "re-create it" in line


def _damaged_nsd(tiny_nsd: Path, tmp_path: Path) -> Path:
    root = tmp_path / "nsd"
    shutil.copytree(tiny_nsd, root)
    return root


def test_empty_stimuli_file_is_one_line(tiny_nsd, tmp_path, stderr_lines):
    root = _damaged_nsd(tiny_nsd, tmp_path)
    stimuli = next(root.rglob("nsd_stimuli.hdf5"))
    stimuli.write_bytes(b"")
    assert main(["prepare", "--nsd-root", str(root), "--out", str(tmp_path / "store")]) == 2
    [line] = stderr_lines()
    assert str(stimuli) in line and "copy it again" in line
    assert not (tmp_path / "store").exists()


def test_truncated_nifti_session_is_one_line(tiny_nsd, tmp_path, stderr_lines):
    root = _damaged_nsd(tiny_nsd, tmp_path)
    for twin in root.rglob("betas_session*.hdf5"):
        twin.unlink()  # read the .nii.gz
    session = next(root.rglob("betas_session02.nii.gz"))
    os.truncate(session, 3000)
    assert main(["prepare", "--nsd-root", str(root), "--out", str(tmp_path / "store")]) == 2
    [line] = stderr_lines()
    assert str(session) in line and "EOFError" in line and "copy it again" in line


@pytest.mark.parametrize("damage", ["not_an_image", "truncated"])
def test_unreadable_png_in_evaluate_is_one_line(damage, tmp_path, stderr_lines):
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("gt", "recons"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png"
            )
    bad = tmp_path / "recons" / "1.png"
    if damage == "truncated":
        os.truncate(bad, bad.stat().st_size // 2)
    else:
        bad.write_text("not a picture")
    args = ["evaluate", "--recons", str(tmp_path / "recons"), "--gt", str(tmp_path / "gt")]
    assert main([*args, "--out", str(tmp_path / "report"), "--nets", "tiny"]) == 2
    [line] = stderr_lines()
    assert f"{bad} is not a readable image" in line


def test_unreadable_png_in_a_resumed_reconstruct_is_one_line(tmp_path):
    """`finish` reads every saved PNG back: a damaged one names itself and what to do."""
    from PIL import Image

    from brainit_pl.metrics.folders import read_rgb

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    for folder in (tmp_path / "gt" / "subj01", tmp_path / "subj01" / "lowlevel"):
        folder.mkdir(parents=True)
        Image.fromarray(pixels).save(folder / "00001.png")
    (tmp_path / "subj01" / "lowlevel" / "00001.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(BrainITError, match="00001.png is not a readable image .* redoes deleted images"):
        finish(tmp_path, ["lowlevel"], [1], "none", None, None)
    assert read_rgb(tmp_path / "gt" / "subj01" / "00001.png").shape == (8, 8, 3)


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def linear_ckpt(tiny_store, tmp_path_factory) -> Path:
    """A one-epoch LinearDecoder checkpoint (configs/tiny.yaml)."""
    root = tmp_path_factory.mktemp("linear")
    args = ["fit", "--config", TINY, "--data.store", str(tiny_store), "--trainer.default_root_dir", str(root)]
    assert main([*args, "--trainer.max_epochs", "1"]) == 0
    return next(root.rglob("last.ckpt"))


def _fit(config: str, store: Path, root: Path, *extra: str) -> int:
    args = ["fit", "--config", config, "--data.store", str(store), "--trainer.default_root_dir", str(root)]
    return main([*args, "--trainer.max_epochs", "1", *extra])


def test_truncated_ckpt_path_is_one_line(linear_ckpt, tiny_store, tmp_path, capsys):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(linear_ckpt.read_bytes()[:20_000])
    assert _fit(TINY, tiny_store, tmp_path / "run", "--ckpt_path", str(cut)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--ckpt_path {cut} is not a readable checkpoint" in line and "truncated" in line
    assert not (tmp_path / "run").exists()


def test_ckpt_path_of_another_module_is_refused(linear_ckpt, tiny_store, tmp_path, capsys):
    assert _fit(ENCODER_TINY, tiny_store, tmp_path / "run", "--ckpt_path", str(linear_ckpt)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a brainit_pl.lit.baseline.LinearDecoder" in line
    assert "the config's model is a brainit_pl.lit.encoder.EncoderModule" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- garbage in
def test_nan_betas_in_the_store_stop_training(tiny_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    with h5py.File(store / "subj01.h5", "r+") as h5:
        row = int(np.flatnonzero(~h5["trials/shared"][()])[0])  # a training trial
        h5["betas"][row, 3] = np.nan
    assert _fit(TINY, store, tmp_path / "run") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{store / 'subj01.h5'}: subject 1, row {row} of betas holds NaN or inf values" in line


def test_reconstruct_rerun_with_corrected_inputs_is_not_refused(tmp_path):
    """A run stopped before its first image (e.g. on a damaged store) leaves run.json: a re-run with other
    inputs may take the folder; once images are saved it may not."""
    settings = {"store": "/a", "seed": 0}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    _check_claim(tmp_path, {**settings, "store": "/b"}, overwrite=False)
    (tmp_path / "subj01" / "lowlevel").mkdir(parents=True)
    (tmp_path / "subj01" / "lowlevel" / "00001.png").write_bytes(b"")
    with pytest.raises(BrainITError, match="interrupted run with other settings"):
        _check_claim(tmp_path, {**settings, "store": "/b"}, overwrite=False)


def test_an_error_from_a_dataloader_worker_is_its_one_line():
    """torch re-raises a worker's BrainITError with the worker's traceback in its message: the CLI keeps the
    last line."""
    from torch._utils import ExceptionWrapper

    from brainit_pl.cli import _user_message

    try:
        raise BrainITError("s/subj01.h5: subject 1, row 0 of betas holds NaN or inf values")
    except BrainITError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BrainITError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    assert _user_message(raised.value) == "s/subj01.h5: subject 1, row 0 of betas holds NaN or inf values"
