"""``brainit-pl reconstruct`` end to end with tiny twins: the stages, the files, resume and the refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainit_pl.cli import main
from test_bit_lit import LOWLEVEL, _args

QUICK = (
    "--dip-steps",
    "3",
    "--dip-channels",
    "16",
    "--limit",
    "2",
    "--batch-size",
    "4",
    "--nets",
    "tiny",
    "--device",
    "cpu",
)


@pytest.fixture(scope="module")
def checkpoints(bit_store, tmp_path_factory):
    """Low-level and semantic BIT checkpoints (1 short epoch each) on the tiny store."""
    root = tmp_path_factory.mktemp("recon_ckpts")
    short = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert main(_args(bit_store, root / "sem", *short)) == 0
    assert main(_args(bit_store, root / "low", *short, *LOWLEVEL)) == 0
    return next((root / "low").rglob("last.ckpt")), next((root / "sem").rglob("last.ckpt"))


def _reconstruct(store, out, low, sem, *extra):
    models = ("--lowlevel", str(low), "--semantic", str(sem), "--tiny-unclip")
    return main(["reconstruct", "--store", str(store), "--out", str(out), *models, *QUICK, *extra])


def test_chain_files_and_scores(bit_store, checkpoints, tmp_path):
    low, sem = checkpoints
    out = tmp_path / "out"
    assert _reconstruct(bit_store, out, low, sem, "--tiny-refine") == 0
    for subject in ("subj01", "subj02"):
        for stage in ("lowlevel", "semantic", "refined"):
            pngs = sorted((out / subject / stage).glob("*.png"))
            assert len(pngs) == 2 and Image.open(pngs[0]).size == (224, 224)
            arrays = np.load(out / subject / f"{stage}.npz")
            assert arrays["images"].shape == (2, 3, 224, 224) and arrays["images"].dtype == np.uint8
            assert [f"{i:05d}.png" for i in arrays["nsd_id"]] == [p.name for p in pngs]
    assert len(list((out / "gt" / "subj02").glob("*.png"))) == 2
    assert (out / "reconstructions.png").is_file()
    for stage in ("lowlevel", "semantic", "refined"):
        results = json.loads((out / f"metrics_{stage}" / "metrics.json").read_text())
        assert set(results["per_subject"]) == {"subj01", "subj02"}
        assert -1 <= results["mean"]["pixcorr"] <= 1
    assert json.loads((out / "run.json").read_text())["finished"] is True


def test_resume_redoes_only_missing_images_and_refuses_finished(bit_store, checkpoints, tmp_path, capsys):
    low, sem = checkpoints
    out = tmp_path / "out"
    assert _reconstruct(bit_store, out, low, sem, "--subjects", "1") == 0
    assert _reconstruct(bit_store, out, low, sem, "--subjects", "1") == 2
    assert "already holds a finished reconstruction" in capsys.readouterr().err

    # An interrupted run: not finished, one image of one stage missing.
    settings = json.loads((out / "run.json").read_text())
    del settings["finished"]
    (out / "run.json").write_text(json.dumps(settings))
    kept, lost = sorted((out / "subj01" / "semantic").glob("*.png"))
    lost.unlink()
    before = kept.stat().st_mtime_ns
    assert _reconstruct(bit_store, out, low, sem, "--subjects", "1") == 0
    assert lost.is_file() and kept.stat().st_mtime_ns == before

    settings["dip_steps"] = 99  # an interrupted run with other settings
    (out / "run.json").write_text(json.dumps(settings))
    assert _reconstruct(bit_store, out, low, sem, "--subjects", "1") == 2
    assert "other settings (dip_steps)" in capsys.readouterr().err
    assert _reconstruct(bit_store, out, low, sem, "--subjects", "1", "--overwrite") == 0


def test_refusals(bit_store, checkpoints, tmp_path, capsys):
    low, sem = checkpoints
    assert _reconstruct(bit_store, tmp_path / "a", sem, sem) == 2  # a semantic checkpoint as --lowlevel
    assert "is a semantic BIT checkpoint; --lowlevel needs a lowlevel one" in capsys.readouterr().err
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    assert _reconstruct(bit_store, tmp_path / "b", bogus, sem) == 2
    assert "is not a BIT checkpoint" in capsys.readouterr().err
    assert _reconstruct(bit_store, tmp_path / "c", low, sem, "--subjects", "7") == 2
    assert "subjects [7] are not in the checkpoints' [1, 2]" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    assert _reconstruct(bit_store, tmp_path / "d", low, sem) == 2
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep me"
    assert main(["reconstruct", "--store", str(bit_store), "--out", str(tmp_path / "e")]) == 2
    assert "give --lowlevel and/or --semantic" in capsys.readouterr().err


def test_semantic_only_from_noise(bit_store, checkpoints, tmp_path):
    _, sem = checkpoints
    out = tmp_path / "out"
    args = [
        "reconstruct",
        "--store",
        str(bit_store),
        "--out",
        str(out),
        "--semantic",
        str(sem),
        "--tiny-unclip",
    ]
    assert main([*args, *QUICK, "--subjects", "2", "--nets", "none"]) == 0
    assert len(list((out / "subj02" / "semantic").glob("*.png"))) == 2
    assert not (out / "subj02" / "lowlevel").exists() and not (out / "metrics_semantic").exists()
    assert Path(out / "reconstructions.png").is_file()
