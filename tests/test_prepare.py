"""`brainit-pl prepare` end to end: a simulated tiny NSD → store, checked against the simulator's truth."""

import json
import logging
import re
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
from nibabel.freesurfer import write_geometry
from scipy.io import loadmat
from skimage.transform import resize

from brainit_pl.cli import main
from brainit_pl.data.layout import NSDLayout
from brainit_pl.data.prepare import prepare
from brainit_pl.data.splits import make_samples, split_subject
from brainit_pl.data.store import FORMAT_VERSION, Store
from brainit_pl.errors import BrainITError
from test_nsd_reader import SUBJECTIM, TPS, make_tree


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Simulate `tiny` (seed 0) once and prepare it once: (raw root, store)."""
    from brainit_pl.data.sim.simulate import simulate

    base = tmp_path_factory.mktemp("prepare")
    root = simulate(base / "nsd", "tiny", seed=0)
    assert main(["prepare", "--nsd-root", str(root), "--out", str(base / "store")]) == 0
    return NSDLayout(root), Store(base / "store")


def _design(lay):
    mat = loadmat(lay.expdesign)
    return mat["masterordering"].ravel().astype(int), mat["sharedix"].ravel().astype(int)


def _n_sessions(lay, subject):
    return len(sorted(lay.betas_dir(subject).glob("betas_session*.nii.gz")))


def _tps(lay):
    return int(nib.load(lay.betas_nifti(1, 1)).shape[3])


def _truth(lay, subject):
    return np.load(lay.root / "simulation" / f"subj{subject:02d}.npz")


# ------------------------------------------------------------------------------------------ bookkeeping
def test_trial_table_matches_the_simulators_truth(sim):
    lay, store = sim
    order, sharedix = _design(lay)
    tps = _tps(lay)
    assert store.subjects == NSDLayout(lay.root).subjects_on_disk() and len(store.subjects) >= 2
    for s in store.subjects:
        sub, truth = store.subject(s), _truth(lay, s)
        n = _n_sessions(lay, s) * tps
        t = sub.trials
        assert sub.n_trials == n and sub.trials_per_session == tps
        np.testing.assert_array_equal(t["global_trial"], np.arange(n))
        np.testing.assert_array_equal(t["session"], np.arange(n) // tps + 1)
        np.testing.assert_array_equal(t["trial"], np.arange(n) % tps)
        np.testing.assert_array_equal(t["nsd_id"], truth["nsd_ids"][order[:n] - 1])
        np.testing.assert_array_equal(t["shared"], order[:n] <= len(sharedix))
        for img in np.unique(t["nsd_id"]):  # repeats 0, 1, 2 in presentation order
            rows = np.flatnonzero(t["nsd_id"] == img)
            np.testing.assert_array_equal(t["repeat"][rows], np.arange(len(rows)))
            assert len(rows) <= 3
        if _n_sessions(lay, s) * tps == len(order):  # a subject with every session sees each image 3 times
            assert set(np.bincount(t["nsd_id"])[np.unique(t["nsd_id"])]) == {3}


def test_test_images_are_shared_and_never_trained_on(sim):
    lay, store = sim
    _, sharedix = _design(lay)
    shared = set((sharedix - 1).tolist())
    per_subject = []
    for s in store.subjects:
        t = store.subject(s).trials
        test_ids, train_ids = set(t["nsd_id"][t["shared"]].tolist()), set(t["nsd_id"][~t["shared"]].tolist())
        assert test_ids and train_ids
        assert test_ids <= shared and not train_ids & shared
        per_subject.append(test_ids)
    assert all(ids == per_subject[0] for ids in per_subject)


def test_voxels_are_the_roi(sim):
    lay, store = sim
    for s in store.subjects:
        sub, truth = store.subject(s), _truth(lay, s)
        roi = nib.load(lay.nsdgeneral(s))
        mask = np.asarray(roi.dataobj) > 0
        assert sub.n_voxels == int(mask.sum()) == len(truth["ijk"])
        np.testing.assert_array_equal(sub.ijk, truth["ijk"])
        np.testing.assert_allclose(sub.xyz, nib.affines.apply_affine(roi.affine, sub.ijk), atol=1e-4)
        assert store.manifest["subjects"][str(s)]["n_voxels"] == sub.n_voxels


def _reference_betas(lay, subject, session):
    """NIfTI / 300, z-scored per voxel over the session (ddof=0) → (T, V) float64, straight from the files."""
    mask = np.asarray(nib.load(lay.nsdgeneral(subject)).dataobj) > 0
    raw = np.asarray(nib.load(lay.betas_nifti(subject, session)).dataobj, dtype=np.float64)[mask].T / 300.0
    std = raw.std(axis=0)
    return np.where(std > 0, (raw - raw.mean(axis=0)) / np.where(std > 0, std, 1), 0.0)


def test_betas_are_zscored_nifti_values(sim):
    lay, store = sim
    tps = _tps(lay)
    for s in store.subjects:
        sub = store.subject(s)
        for k in range(_n_sessions(lay, s)):
            got = sub.betas(np.arange(k * tps, (k + 1) * tps))
            ref = _reference_betas(lay, s, k + 1)
            np.testing.assert_allclose(got, ref, atol=4e-3, rtol=2e-3)  # float16 storage
            np.testing.assert_allclose(got.mean(axis=0), 0, atol=5e-3)
            np.testing.assert_allclose(got.std(axis=0), 1, atol=5e-3)


def test_repeats_average_to_the_mean_of_their_trials(sim):
    lay, store = sim
    tps = _tps(lay)
    s = store.subjects[0]
    sub = store.subject(s)
    ref = np.concatenate([_reference_betas(lay, s, k + 1) for k in range(_n_sessions(lay, s))])
    split = split_subject(s, sub.trials, tps, val_fraction=0.0)
    samples = make_samples(s, split.test, sub.trials["nsd_id"], average=True)
    assert len(samples) == len(np.unique(sub.trials["nsd_id"][sub.trials["shared"]]))
    for i in range(len(samples)):
        rows = samples.rows_of(i)
        assert (sub.trials["nsd_id"][rows] == samples.nsd_id[i]).all()
        assert list(sub.trials["repeat"][rows]) == list(range(len(rows)))
        expected = ref[np.flatnonzero(sub.trials["nsd_id"] == samples.nsd_id[i])].mean(axis=0)
        np.testing.assert_allclose(sub.betas(rows).mean(axis=0), expected, atol=4e-3, rtol=2e-3)


def test_image_store_holds_exactly_the_images_seen(sim):
    lay, store = sim
    seen = np.unique(np.concatenate([store.subject(s).trials["nsd_id"] for s in store.subjects]))
    images = store.images
    np.testing.assert_array_equal(images.nsd_ids, seen)
    assert store.manifest["images"] == {"file": "images.h5", "n_images": len(seen), "sizes": [224, 112]}
    with h5py.File(lay.stimuli) as h5:
        brick = h5["imgBrick"]
        for img in seen[:: max(1, len(seen) // 6)]:
            for size in (224, 112):
                got = images.images([img], size=size)[0].transpose(1, 2, 0).astype(float)
                ref = resize(brick[img], (size, size), order=3, anti_aliasing=True, preserve_range=True)
                assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.97
                assert np.abs(got - ref).mean() < 8


def test_manifest_names_the_source(sim):
    lay, store = sim
    m = store.manifest
    assert m["source"]["kind"] == "raw" and m["source"]["root"] == str(lay.root.resolve())
    assert m["source"]["sessions"] == "all" and "brainit_pl_version" in m["source"]
    for s in store.subjects:
        entry = m["subjects"][str(s)]
        assert entry["n_sessions"] == _n_sessions(lay, s) and entry["space"] == "func1pt8mm"
        assert entry["n_trials"] == store.subject(s).n_trials


def test_first_sessions_only_and_overwrite(sim, tmp_path):
    lay, _ = sim
    out = tmp_path / "store"
    prepare(lay.root, out, [2], sessions=1)
    store = Store(out)
    assert store.subjects == [2] and store.subject(2).n_trials == _tps(lay)
    assert set(store.images.nsd_ids.tolist()) == set(store.subject(2).trials["nsd_id"].tolist())
    prepare(lay.root, out, [1], sessions=1, overwrite=True)
    assert Store(out).subjects == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# ------------------------------------------------------------------------------------------ bad input
def _copy(sim, tmp_path):
    lay, _ = sim
    root = tmp_path / "nsd"
    shutil.copytree(lay.root, root, ignore=shutil.ignore_patterns("simulation"))
    return NSDLayout(root)


def _fails(stderr_lines, tmp_path, args, match):
    """Run prepare through the CLI; expect exit 2, one stderr line matching, and nothing left on disk."""
    out = tmp_path / "out" / "store"
    out.parent.mkdir(exist_ok=True)
    stderr_lines()
    assert main(["prepare", *args, "--out", str(out)]) == 2
    err = stderr_lines()
    assert len(err) == 1 and err[0].startswith("brainit-pl prepare: error: "), err
    assert re.search(match, err[0]), err[0]
    assert list(out.parent.iterdir()) == []  # no store, no temporary folder
    return err[0]


def test_missing_root_and_files(stderr_lines, tmp_path, sim):
    _fails(stderr_lines, tmp_path, ["--nsd-root", str(tmp_path / "nope")], "NSD root .*nope not found")
    _fails(
        stderr_lines, tmp_path, ["--mindeye2-root", str(tmp_path / "nope")], "MindEye2 root .*nope not found"
    )
    _fails(
        stderr_lines,
        tmp_path,
        ["--mindeye2-root", str(tmp_path), "--sessions", "1"],
        "apply to a raw NSD root",
    )
    lay = _copy(sim, tmp_path)
    lay.stimuli.unlink()
    _fails(stderr_lines, tmp_path, ["--nsd-root", str(lay.root)], "nsd_stimuli.hdf5 not found")
    lay.expdesign.unlink()
    _fails(stderr_lines, tmp_path, ["--nsd-root", str(lay.root)], "nsd_expdesign.mat not found")


def test_unknown_subject_and_too_many_sessions(stderr_lines, tmp_path, sim):
    lay, store = sim
    found = store.subjects
    _fails(
        stderr_lines,
        tmp_path,
        ["--nsd-root", str(lay.root), "--subjects", "1", "9"],
        re.escape("subject(s) [9] not found") + ".*" + re.escape(f"(found subjects {found})"),
    )
    with pytest.raises(BrainITError, match="no subjects to prepare"):
        prepare(lay.root, tmp_path / "out" / "store", [])
    n = _n_sessions(lay, 1)
    _fails(
        stderr_lines,
        tmp_path,
        ["--nsd-root", str(lay.root), "--subjects", "1", "--sessions", str(n + 1)],
        f"--sessions {n + 1} asked, but subject 1 has {n} session",
    )


def _rewrite(lay, subject, session, vol):
    """Replace both twins of a session with ``vol`` (X, Y, Z, T)."""
    nib.save(
        nib.Nifti1Image(vol, nib.load(lay.betas_nifti(subject, session)).affine),
        lay.betas_nifti(subject, session),
    )
    if lay.betas_hdf5(subject, session).exists():
        with h5py.File(lay.betas_hdf5(subject, session), "w") as h5:
            h5["betas"] = np.ascontiguousarray(vol.transpose(3, 2, 1, 0))


def test_wrong_trial_count(stderr_lines, tmp_path, sim):
    lay = _copy(sim, tmp_path)
    vol = np.asarray(nib.load(lay.betas_nifti(2, 1)).dataobj)
    _rewrite(lay, 2, 1, vol[..., :-1])
    tps = vol.shape[3]
    _fails(
        stderr_lines,
        tmp_path,
        ["--nsd-root", str(lay.root)],
        rf"betas_session01\.\w+ has {tps - 1} trials, expected {tps}",
    )


def test_mask_shape_differs_from_betas(stderr_lines, tmp_path, sim):
    lay = _copy(sim, tmp_path)
    roi = nib.load(lay.nsdgeneral(1))
    data = np.asarray(roi.dataobj)
    nib.save(nib.Nifti1Image(np.pad(data, ((0, 1), (0, 0), (0, 0))), roi.affine), lay.nsdgeneral(1))
    _fails(stderr_lines, tmp_path, ["--nsd-root", str(lay.root)], "nsdgeneral mask has")


def test_nan_and_inf_betas(stderr_lines, tmp_path, sim):
    lay = _copy(sim, tmp_path)
    mask = np.asarray(nib.load(lay.nsdgeneral(1)).dataobj) > 0
    vol = np.asarray(nib.load(lay.betas_nifti(1, 1)).dataobj).astype(np.float32)
    i, j, k = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    vol[i, j, k, 3], vol[i, j, k, 4] = np.nan, np.inf
    _rewrite(lay, 1, 1, vol)
    _fails(stderr_lines, tmp_path, ["--nsd-root", str(lay.root)], r"betas_session01\.\w+ contains 2 NaN/inf")


def test_existing_out_is_kept(stderr_lines, tmp_path, sim):
    lay, _ = sim
    out = tmp_path / "store"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        stderr_lines()
        assert main(["prepare", "--nsd-root", str(lay.root), "--out", str(out), *extra]) == 2
        err = stderr_lines()
        assert len(err) == 1 and ("already exists" in err[0] or "not a brainit-pl store" in err[0]), err
        assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_incompatible_store_version_is_refused(sim, tmp_path):
    _, store = sim
    copy = shutil.copytree(store.root, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BrainITError, match="incompatible brainit-pl store format"):
        Store(copy)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--nsd-root",
        "--mindeye2-root",
        "--out",
        "--subjects",
        "--sessions",
        "--space",
        "--surface-mask",
        "--overwrite",
        "manifest.json",
        "images.h5",
    ):
        assert option in text


# ------------------------------------------------------------------------------------------ hand-made trees
def test_empty_splits(tmp_path, caplog):
    """Sessions without shared images: a warning (an hour subset); sessions with only shared images: an error."""
    late_test = np.r_[np.repeat([3, 4, 5, 6], 3), np.repeat([1, 2], 3)]  # session 3 = the shared images
    lay, _ = make_tree(tmp_path / "a", order=late_test)
    with caplog.at_level(logging.WARNING):
        prepare(lay.root, tmp_path / "a_store", [1], sessions=1)
    assert "subject 1: no shared-image (test) trial in sessions [1]" in caplog.text
    assert not Store(tmp_path / "a_store").subject(1).trials["shared"].any()
    early_test = np.r_[np.repeat([1, 2], 3), np.repeat([3, 4, 5, 6], 3)]  # session 1 = the shared images
    lay, _ = make_tree(tmp_path / "b", order=early_test)
    with pytest.raises(
        BrainITError, match=r"subject 2: sessions \[1\] hold only shared .* training split would be empty"
    ):
        prepare(lay.root, tmp_path / "b_store", [2], sessions=1)
    assert not (tmp_path / "b_store").exists()


def test_fsaverage_space_reads_the_masked_vertices(tmp_path):
    lay, _ = make_tree(tmp_path / "nsd")
    n_vert = 12
    keep = np.zeros(2 * n_vert, dtype=bool)
    keep[[1, 4, 5, 11, 12, 20, 23]] = True
    np.save(tmp_path / "mask.npy", keep)
    rng = np.random.default_rng(3)
    expected = []
    for session in (1, 2, 3):
        halves = []
        for hemi in ("lh", "rh"):
            data = rng.normal(size=(n_vert, 1, 1, TPS)).astype(np.float32)
            path = lay.betas_mgh(1, session, hemi)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.MGHImage(data, np.eye(4)), path)
            halves.append(data[:, 0, 0, :])
        block = np.concatenate(halves)[keep].T  # (T, V), lh then rh
        expected.append((block - block.mean(0)) / block.std(0))
    out = prepare(lay.root, tmp_path / "store", [1], space="fsaverage", surface_mask=tmp_path / "mask.npy")
    sub = Store(out).subject(1)
    assert sub.space == "fsaverage" and sub.n_voxels == keep.sum() and sub.n_trials == 3 * TPS
    np.testing.assert_array_equal(sub.ijk[:, :2], [[1, 0], [4, 0], [5, 0], [11, 0], [0, 1], [8, 1], [11, 1]])
    np.testing.assert_allclose(sub.betas(np.arange(3 * TPS)), np.concatenate(expected), atol=4e-3, rtol=2e-3)
    assert list(sub.trials["nsd_id"][:TPS]) == [
        SUBJECTIM[0, c - 1] - 1 for c in loadmat(lay.expdesign)["masterordering"].ravel()[:TPS]
    ]
    assert not sub.xyz.any()  # no surface folder: no geometry
    with pytest.raises(BrainITError, match="--surface-mask goes with --space fsaverage"):
        prepare(lay.root, tmp_path / "store2", [1], space="fsaverage")

    # With the fsaverage surfaces, the store holds each selected vertex's pial coordinates.
    coords = {h: rng.normal(size=(n_vert, 3)) * 50 for h in ("lh", "rh")}
    (tmp_path / "surf").mkdir()
    for hemi, xyz in coords.items():
        write_geometry(tmp_path / "surf" / f"{hemi}.pial", xyz, np.array([[0, 1, 2]]))
    out = prepare(
        lay.root,
        tmp_path / "store3",
        [1],
        space="fsaverage",
        surface_mask=tmp_path / "mask.npy",
        fsaverage_surf=tmp_path / "surf",
    )
    expected_xyz = np.concatenate([coords["lh"], coords["rh"]])[keep]
    np.testing.assert_allclose(Store(out).subject(1).xyz, expected_xyz, rtol=1e-5)
    with pytest.raises(BrainITError, match="--fsaverage-surf goes with --space fsaverage"):
        prepare(lay.root, tmp_path / "store4", [1], fsaverage_surf=tmp_path / "surf")
