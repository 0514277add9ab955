"""The simulated NSD: file layout and formats, design bookkeeping, the brain model's science, determinism."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io as sio

from brainit_pl.cli import main
from brainit_pl.data.layout import NSD_BETA_SCALE, NSDLayout
from brainit_pl.data.sim import simulate as sim_module
from brainit_pl.data.sim.design import build_design
from brainit_pl.data.sim.presets import PRESETS, get_preset
from brainit_pl.data.sim.simulate import simulate
from brainit_pl.data.sim.stimuli import TREE_STREAM, generate_stimuli, make_external_images
from brainit_pl.data.sim.truth import true_responses
from brainit_pl.errors import BrainITError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate(tmp_path_factory.mktemp("sim") / "nsd", "tiny", seed=3)


def _truth(root: Path, subject: int) -> dict[str, np.ndarray]:
    with np.load(root / f"simulation/subj{subject:02d}.npz") as f:
        return {k: f[k] for k in f.files}


def _expdesign(root: Path) -> dict[str, np.ndarray]:
    e = sio.loadmat(NSDLayout(root).expdesign)
    return {
        k: np.asarray(e[k]).astype(np.int64)
        for k in ("masterordering", "subjectim", "sharedix", "stimpattern")
    }


def test_presets_add_up_like_nsd() -> None:
    full = get_preset("full")
    assert (full.n_images_per_subject, full.n_shared, full.n_images) == (10000, 1000, 73000)
    assert full.sessions == (40, 40, 32, 30, 40, 32, 40, 30)
    design = build_design(full.with_overrides(subjects=1), np.random.default_rng(0))
    assert design.stimpattern.shape == (40, 12, 75)
    assert set(design.stimpattern.sum(axis=(1, 2)).tolist()) == {750}
    assert np.bincount(design.masterordering)[1:].tolist() == [3] * 10000
    demo = get_preset("demo")
    assert min(demo.sessions) < max(demo.sessions)  # one subject stops early, as in NSD
    with pytest.raises(BrainITError, match="n_shared"):
        dataclasses.replace(PRESETS["tiny"], n_shared=30)  # 30 = all of a subject's images
    with pytest.raises(BrainITError, match="not divisible"):
        dataclasses.replace(PRESETS["tiny"], trials_per_session=44)
    with pytest.raises(BrainITError, match="unknown simulation preset"):
        get_preset("huge")


def test_layout_files_and_formats(tiny: Path) -> None:
    layout = NSDLayout(tiny)
    p = get_preset("tiny")
    assert layout.subjects_on_disk() == [1, 2]
    counts = []
    for s in (1, 2):
        assert layout.sessions_on_disk(s) == [1, 2]
        roi_img = nib.load(layout.nsdgeneral(s))
        roi = np.asarray(roi_img.dataobj)
        assert roi.dtype in (np.int16, np.int32) and set(np.unique(roi)) == {-1, 0, 1}
        truth = _truth(tiny, s)
        ijk = np.argwhere(roi > 0)
        np.testing.assert_array_equal(truth["ijk"], ijk)
        counts.append(len(ijk))
        ncsnr = nib.load(layout.ncsnr(s))
        assert ncsnr.get_data_dtype() == np.float32
        np.testing.assert_allclose(np.asarray(ncsnr.dataobj)[tuple(ijk.T)], truth["ncsnr"])
        img = nib.load(layout.betas_nifti(s, 1))
        assert img.shape == (*roi.shape, p.trials_per_session) and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine, roi_img.affine)
        np.testing.assert_allclose(np.diag(img.affine)[:3], [p.voxel_mm] * 3)
        betas = np.asarray(img.dataobj)
        assert not betas[roi <= 0].any()  # nothing outside the ROI
        with h5py.File(layout.betas_hdf5(s, 1), "r") as f:
            np.testing.assert_array_equal(f["betas"][:], betas.transpose(3, 2, 1, 0))
        xyz = nib.affines.apply_affine(roi_img.affine, ijk)
        np.testing.assert_allclose(truth["xyz"], xyz, atol=1e-4)
    assert counts[0] != counts[1] and 200 < min(counts) and max(counts) < 1000
    with h5py.File(layout.stimuli, "r") as f:
        brick = f["imgBrick"]
        assert brick.shape == (p.n_images, p.image_size, p.image_size, 3) and brick.dtype == np.uint8
        assert brick[0].std() > 5  # not blank


def test_design_files_agree(tiny: Path) -> None:
    p, layout, e = get_preset("tiny"), NSDLayout(tiny), _expdesign(tiny)
    mo, subjectim, sharedix = e["masterordering"][0], e["subjectim"], e["sharedix"][0]
    assert mo.shape == (p.n_sessions_max * p.trials_per_session,)
    assert np.bincount(mo, minlength=p.n_images_per_subject + 1)[1:].tolist() == [3] * p.n_images_per_subject
    assert (subjectim[:, : p.n_shared] == sharedix).all()
    assert len(np.unique(subjectim)) == p.n_images  # own images are disjoint across subjects
    assert e["stimpattern"].sum(axis=(1, 2)).tolist() == [p.trials_per_session] * p.n_sessions_max
    info = pd.read_csv(layout.stim_info, index_col=0)
    assert len(info) == p.n_images and (info["nsdId"].to_numpy() == np.arange(p.n_images)).all()
    np.testing.assert_array_equal(np.flatnonzero(info["shared1000"].to_numpy()) + 1, sharedix)
    for s in (1, 2):
        tsv = pd.read_csv(layout.responses(s), sep="\t")
        assert list(tsv.columns[:5]) == ["SUBJECT", "SESSION", "RUN", "TRIAL", "73KID"]
        ids = subjectim[s - 1, mo - 1]  # 1-based 73k id of every trial
        np.testing.assert_array_equal(tsv["73KID"].to_numpy(), ids)
        assert tsv.groupby("SESSION").size().tolist() == [p.trials_per_session] * 2
        for r in range(3):  # each stim-info rep column points at a trial showing that image
            rep = info[f"subject{s}_rep{r}"].to_numpy()
            seen = np.flatnonzero(rep > 0)
            np.testing.assert_array_equal(ids[rep[seen] - 1], seen + 1)
        assert (info[f"subject{s}"].to_numpy()[subjectim[s - 1] - 1] == 1).all()
        assert info[f"subject{s}"].sum() == p.n_images_per_subject
        counts = np.bincount(ids, minlength=p.n_images + 1)
        assert (counts[sharedix] == 3).all()  # every shared image seen 3 times by every subject
        np.testing.assert_array_equal(_truth(tiny, s)["nsd_ids"], subjectim[s - 1] - 1)


def test_betas_follow_the_generative_model(tiny: Path) -> None:
    """beta = gain * (response + noise) + offset, with noise ~ N(0, noise_sd) and the truth's arrays."""
    layout, e, p = NSDLayout(tiny), _expdesign(tiny), get_preset("tiny")
    t = _truth(tiny, 1)
    tps = p.trials_per_session
    for session in (1, 2):
        betas = np.asarray(nib.load(layout.betas_nifti(1, session)).dataobj)[tuple(t["ijk"].T)].T
        betas = betas.astype(np.float64) / NSD_BETA_SCALE  # (T, V)
        cols = e["masterordering"][0][(session - 1) * tps : session * tps] - 1
        gain, offset = t["session_gain"][session - 1], t["session_offset"][session - 1]
        noise = ((betas - offset) / gain - t["responses"][cols]) / t["noise_sd"]
        assert abs(noise.mean()) < 0.05 and 0.95 < noise.std() < 1.05
    assert t["session_gain"].std() > 0.05 and t["session_offset"].std() > 0.1  # z-scoring matters


def test_functional_types_and_category_selectivity(tiny: Path) -> None:
    meta = json.loads((tiny / "simulation/truth.json").read_text())
    stimuli = json.loads((tiny / "simulation/stimuli.json").read_text())
    assert len(stimuli) == get_preset("tiny").n_images and meta["sizes"]["n_voxels"]["1"] > 0
    for s in (1, 2):
        t = _truth(tiny, s)
        corr = np.corrcoef(t["responses"].T)
        same = t["type"][:, None] == t["type"][None, :]
        off = ~np.eye(len(corr), dtype=bool)
        assert corr[same & off].mean() > corr[~same].mean() + 0.2
        place_type = meta["types"].index("place")
        coverage = np.array([stimuli[i]["coverage"].get("place", 0.0) for i in t["nsd_ids"]])
        mean_place = t["responses"][:, t["type"] == place_type].mean(axis=1)
        assert np.corrcoef(mean_place, coverage)[0, 1] > 0.6
        assert set(np.unique(t["area"])) >= {0, 1, 2}  # V1-V3 present
        assert np.all((t["prf_size"] > 0) & np.isfinite(t["prf_xy"]).all(1))
        # contralateral: left-hemisphere early voxels see mostly the right visual field
        left = (t["template_xyz"][:, 0] < -5) & (t["area"] <= 2)
        assert (t["prf_xy"][left, 0] > 0).mean() > 0.7


def test_functional_types_are_shared_by_subjects(tiny: Path) -> None:
    """On the shared images, a type's mean response in subject 1 tracks the same type in subject 2."""
    n_shared = get_preset("tiny").n_shared
    a, b = _truth(tiny, 1), _truth(tiny, 2)
    np.testing.assert_array_equal(a["nsd_ids"][:n_shared], b["nsd_ids"][:n_shared])
    common = np.intersect1d(a["type"], b["type"])
    mean_a = np.stack([a["responses"][:n_shared, a["type"] == t].mean(1) for t in common])
    mean_b = np.stack([b["responses"][:n_shared, b["type"] == t].mean(1) for t in common])
    corr = np.corrcoef(mean_a, mean_b)[: len(common), len(common) :]  # (types in 1, types in 2)
    off = ~np.eye(len(common), dtype=bool)
    assert np.nanmean(np.diag(corr)) > np.nanmean(corr[off]) + 0.3


def test_same_seed_same_arrays_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = simulate(tmp_path / "a", "tiny", seed=3)
    other = simulate(tmp_path / "b", "tiny", seed=4, subjects=1, sessions=1)
    la, lt, lo = NSDLayout(again), NSDLayout(tiny), NSDLayout(other)
    for s in (1, 2):
        for session in (1, 2):
            np.testing.assert_array_equal(
                np.asarray(nib.load(la.betas_nifti(s, session)).dataobj),
                np.asarray(nib.load(lt.betas_nifti(s, session)).dataobj),
            )
        a, b = _truth(again, s), _truth(tiny, s)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with h5py.File(la.stimuli, "r") as fa, h5py.File(lt.stimuli, "r") as fb, h5py.File(lo.stimuli, "r") as fo:
        np.testing.assert_array_equal(fa["imgBrick"][:], fb["imgBrick"][:])
        assert not np.array_equal(fa["imgBrick"][0], fo["imgBrick"][0])
    assert lo.subjects_on_disk() == [1] and lo.sessions_on_disk(1) == [1]
    assert (_expdesign(other)["stimpattern"].shape[0], len(_expdesign(other)["masterordering"][0])) == (1, 45)


def test_refuses_non_empty_out_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch, stderr_lines
) -> None:
    out = tmp_path / "nsd"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BrainITError, match="--overwrite"):
        simulate(out, "tiny")
    assert main(["simulate", "--out", str(out), "--preset", "tiny"]) == 2
    err = stderr_lines()
    assert len(err) == 1 and "not empty" in err[0]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sim_module, "_write_subject", boom)
    with pytest.raises(RuntimeError):
        simulate(out, "tiny", subjects=1, sessions=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nsd"]  # no temporary left behind
    assert (out / "keep.txt").read_text() == "mine"  # the old tree is untouched
    monkeypatch.undo()
    simulate(out, "tiny", subjects=1, sessions=1, overwrite=True)
    assert not (out / "keep.txt").exists() and NSDLayout(out).sessions_on_disk(1) == [1]


def test_cli_help_and_run(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    assert "--preset" in capsys.readouterr().out
    argv = f"simulate --out {tmp_path / 'x'} --preset tiny --subjects 1 --sessions 1 --seed 5".split()
    assert main(argv) == 0
    assert NSDLayout(tmp_path / "x").subjects_on_disk() == [1]
    assert main(["simulate", "--out", str(tmp_path / "y"), "--sessions", "0"]) == 2


def test_external_images_come_from_another_stream() -> None:
    images, content = make_external_images(4, seed=3, size=48)
    assert images.shape == (4, 48, 48, 3) and images.dtype == np.uint8 and len(content) == 4
    again, _ = make_external_images(4, seed=3, size=48)
    np.testing.assert_array_equal(images, again)
    tree = generate_stimuli(np.arange(4), seed=3, size=48, feature_size=24).images
    assert not any(np.array_equal(a, b) for a, b in zip(images, tree))
    assert all("layers" in c and "coverage" in c for c in content)


@pytest.mark.slow
def test_empirical_ncsnr_matches_truth(tmp_path: Path) -> None:
    """NSD's ncsnr estimate (per-session z-score, variance across the 3 repeats) recovers the truth."""
    root = simulate(tmp_path / "demo", "demo", seed=1, subjects=1)
    layout, e, t = NSDLayout(root), _expdesign(root), _truth(root, 1)
    z = []
    for session in layout.sessions_on_disk(1):
        b = np.asarray(nib.load(layout.betas_nifti(1, session)).dataobj)[tuple(t["ijk"].T)].T
        b = b.astype(np.float64)
        z.append((b - b.mean(0)) / b.std(0))
    z = np.concatenate(z)
    cols = e["masterordering"][0][: len(z)]
    full = np.flatnonzero(np.bincount(cols) == 3)
    noise_var = np.mean([z[cols == c].var(axis=0, ddof=1) for c in full], axis=0)
    estimate = np.sqrt(np.clip(1 - noise_var, 0, None) / noise_var)
    assert np.corrcoef(estimate, t["ncsnr"])[0, 1] > 0.9
    assert abs(np.median(estimate) / np.median(t["ncsnr"]) - 1) < 0.15
    assert 0.25 < np.median(t["ncsnr"]) < 0.6 and 0.02 < np.mean(t["ncsnr"] > 1) < 0.2


def test_true_responses_rebuild_the_model(tiny: Path) -> None:
    t = _truth(tiny, 2)
    again = true_responses(tiny, 2, t["nsd_ids"], stream=TREE_STREAM)
    np.testing.assert_allclose(again, t["responses"], rtol=1e-4, atol=1e-4)
    external = true_responses(tiny, 2, np.arange(3))
    assert external.shape == (3, len(t["ijk"])) and np.isfinite(external).all()
    assert not np.allclose(external, t["responses"][:3])
    with pytest.raises(BrainITError, match="not found"):
        true_responses(tiny, 9, np.arange(1))


def test_cli_writes_preview_pictures(tmp_path):
    from brainit_pl.cli import main

    out = tmp_path / "nsd"
    assert main(["simulate", "--out", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    pictures = sorted(p.name for p in (out / "simulation").glob("preview_*.png"))
    assert pictures == [
        "preview_stimuli.png",
        "preview_subj01_areas.png",
        "preview_subj01_ncsnr.png",
        "preview_subj02_areas.png",
        "preview_subj02_ncsnr.png",
    ]
