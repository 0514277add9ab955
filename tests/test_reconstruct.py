"""``brainit-pl reconstruct`` end to end with tiny twins: the stages, the files, resume and the refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainit_pl.cli import main
from conftest import Checkpoints

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


def _reconstruct(store, out, ckpts, *extra, stock=False):
    models = ("--lowlevel", str(ckpts.lowlevel), "--stage2", str(ckpts.stage2))
    if stock:
        models += ("--semantic-stock", str(ckpts.semantic), "--tiny-unclip")
    return main(["reconstruct", "--store", str(store), "--out", str(out), *models, *QUICK, *extra])


def test_chain_files_and_scores(bit_store, checkpoints, tmp_path, read_report):
    out = tmp_path / "out"
    assert _reconstruct(bit_store, out, checkpoints, "--tiny-refine", stock=True) == 0
    for subject in ("subj01", "subj02"):
        for stage in ("lowlevel", "semantic", "semantic_stock", "refined"):
            pngs = sorted((out / subject / stage).glob("*.png"))
            assert len(pngs) == 2 and Image.open(pngs[0]).size == (224, 224)
            arrays = np.load(out / subject / f"{stage}.npz")
            assert arrays["images"].shape == (2, 3, 224, 224) and arrays["images"].dtype == np.uint8
            assert [f"{i:05d}.png" for i in arrays["nsd_id"]] == [p.name for p in pngs]
    assert len(list((out / "gt" / "subj02").glob("*.png"))) == 2
    assert (out / "reconstructions.png").is_file()
    for stage in ("lowlevel", "semantic", "semantic_stock", "refined"):
        results = json.loads((out / f"metrics_{stage}" / "metrics.json").read_text())
        assert set(results["per_subject"]) == {"subj01", "subj02"}
        assert -1 <= results["mean"]["pixcorr"] <= 1
    assert json.loads((out / "run.json").read_text())["finished"] is True
    text, n_images, n_tables = read_report(
        out / "report.html"
    )  # ground truth + 4 stages, 2 images, 2 subjects
    assert n_images == 2 * 2 * 5 and n_tables == 2 + 4 and "semantic_stock" in text
    # the method and the ablation start from the same DIP image and noise: only the models differ
    method, stock = (np.load(out / "subj01" / f"{s}.npz")["images"] for s in ("semantic", "semantic_stock"))
    assert method.shape == stock.shape and not np.array_equal(method, stock)


def test_resume_redoes_only_missing_images_and_refuses_finished(bit_store, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert _reconstruct(bit_store, out, checkpoints, "--subjects", "1") == 0
    assert _reconstruct(bit_store, out, checkpoints, "--subjects", "1") == 2
    assert "already holds a finished reconstruction" in capsys.readouterr().err

    # An interrupted run: not finished, one image of one stage missing.
    settings = json.loads((out / "run.json").read_text())
    del settings["finished"]
    (out / "run.json").write_text(json.dumps(settings))
    kept, lost = sorted((out / "subj01" / "semantic").glob("*.png"))
    lost.unlink()
    before = kept.stat().st_mtime_ns
    assert _reconstruct(bit_store, out, checkpoints, "--subjects", "1") == 0
    assert lost.is_file() and kept.stat().st_mtime_ns == before

    settings["dip_steps"] = 99  # an interrupted run with other settings
    (out / "run.json").write_text(json.dumps(settings))
    assert _reconstruct(bit_store, out, checkpoints, "--subjects", "1") == 2
    assert "other settings (dip_steps)" in capsys.readouterr().err
    assert _reconstruct(bit_store, out, checkpoints, "--subjects", "1", "--overwrite") == 0


def test_refusals(bit_store, checkpoints, tmp_path, capsys):
    low, sem, s2 = checkpoints
    wrong = Checkpoints(sem, sem, s2)  # a semantic checkpoint as --lowlevel
    assert _reconstruct(bit_store, tmp_path / "a", wrong) == 2
    assert "is a semantic BIT checkpoint; --lowlevel needs a lowlevel one" in capsys.readouterr().err
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    assert _reconstruct(bit_store, tmp_path / "b", Checkpoints(bogus, sem, s2)) == 2
    assert "is not a BIT checkpoint" in capsys.readouterr().err
    assert _reconstruct(bit_store, tmp_path / "b", Checkpoints(low, sem, bogus)) == 2
    assert "is not a stage-2 checkpoint" in capsys.readouterr().err
    assert _reconstruct(bit_store, tmp_path / "c", checkpoints, "--subjects", "7") == 2
    assert "subjects [7] are not in the checkpoints' [1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was written
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    assert _reconstruct(bit_store, tmp_path / "d", checkpoints) == 2
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep me"
    assert main(["reconstruct", "--store", str(bit_store), "--out", str(tmp_path / "e")]) == 2
    assert "give --lowlevel and/or --stage2" in capsys.readouterr().err
    old = ["reconstruct", "--store", str(bit_store), "--out", str(tmp_path / "f"), "--semantic", str(sem)]
    assert main(old) == 2
    assert "--semantic is gone" in capsys.readouterr().err


def test_stage2_of_other_clusters_is_refused(bit_store, checkpoints, tmp_path, capsys):
    """A stage-2 model whose BIT has other V2C clusters than the low-level BIT's: one line, nothing written."""
    import torch

    from brainit_pl.errors import BrainITError
    from brainit_pl.lit.loading import load_bit, load_stage2
    from brainit_pl.recon.chain import Reconstructor

    low = load_bit(checkpoints.lowlevel, "lowlevel", torch.device("cpu"))
    s2 = load_stage2(checkpoints.stage2, torch.device("cpu"))
    s2.net.cluster_of_voxel = (s2.net.cluster_of_voxel + 1) % 4
    with pytest.raises(BrainITError, match="V2C clusters differ from the lowlevel model's"):
        Reconstructor(low, s2, dip_steps=1)


def test_semantic_only_from_noise(bit_store, checkpoints, tmp_path):
    out = tmp_path / "out"
    args = ["reconstruct", "--store", str(bit_store), "--out", str(out), "--stage2", str(checkpoints.stage2)]
    assert main([*args, *QUICK, "--subjects", "2", "--nets", "none"]) == 0
    assert len(list((out / "subj02" / "semantic").glob("*.png"))) == 2
    assert not (out / "subj02" / "lowlevel").exists() and not (out / "metrics_semantic").exists()
    assert Path(out / "reconstructions.png").is_file()


def test_dip_lr_reaches_the_dip(bit_store, checkpoints, tmp_path, capsys):
    """--dip-lr is recorded in run.json and changes the low-level images (the DIP's Adam rate)."""
    quick = ("--subjects", "1", "--nets", "none")
    assert _reconstruct(bit_store, tmp_path / "a", checkpoints, *quick) == 0
    assert _reconstruct(bit_store, tmp_path / "b", checkpoints, *quick, "--dip-lr", "0.01") == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["dip_lr"] == 0.01
    a, b = (np.load(tmp_path / x / "subj01" / "lowlevel.npz")["images"] for x in ("a", "b"))
    assert not np.array_equal(a, b)
    assert _reconstruct(bit_store, tmp_path / "c", checkpoints, *quick, "--dip-lr", "0") == 2
    assert "--dip-lr must be positive" in capsys.readouterr().err
