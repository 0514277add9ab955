"""Unit tests of the raw NSD reader on a hand-made miniature tree (unequal shapes 7, 8, 9 on purpose)."""

import logging

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat
from skimage.transform import resize

from brainit_pl.data.expdesign import read_expdesign
from brainit_pl.data.layout import NSDLayout
from brainit_pl.data.nsd import NSDReader, zscore_session
from brainit_pl.errors import BrainITError

SHAPE = (7, 8, 9)
TPS = 6  # trials per session: 3 stimulus trials in each of 2 runs
SUBJECTIM = np.array([[10, 20, 31, 32, 33, 34], [20, 10, 41, 42, 43, 44]])  # 1-based 73k ids
SHAREDIX = np.array([10, 20])
AFFINE = np.array([[1.8, 0, 0, -5], [0, 1.8, 0, 3], [0, 0, 1.8, 7], [0, 0, 0, 1]])


def _masterordering(seed=0):
    """3 sessions x 6 trials: every subjectim column (1..6) shown three times, shuffled."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(1, 7), 3))


def _stimpattern():
    pattern = np.zeros((3, 2, 4))
    pattern[:, :, 1:] = 1
    return pattern


def _betas(subject, session):
    rng = np.random.default_rng(100 * subject + session)
    return rng.integers(-900, 900, size=(*SHAPE, TPS)).astype(np.int16)  # (X, Y, Z, T)


def _write_nifti(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def _write_h5_twin(path, vol):
    with h5py.File(path, "w") as h5:
        h5["betas"] = np.ascontiguousarray(vol.transpose(3, 2, 1, 0))  # (T, Z, Y, X)


def make_tree(root, *, h5_twin=True, responses=True, order=None):
    """A raw NSD tree: 2 subjects, 3 sessions of 6 trials, 50 stimuli of 20x20 pixels.

    ``order`` replaces the default (shuffled) masterordering; responses.tsv is then not written.
    """
    lay = NSDLayout(root)
    lay.expdesign.parent.mkdir(parents=True)
    responses = responses and order is None
    order = _masterordering() if order is None else np.asarray(order)
    savemat(
        lay.expdesign,
        {
            "masterordering": order[None],
            "subjectim": SUBJECTIM,
            "sharedix": SHAREDIX[None],
            "stimpattern": _stimpattern(),
        },
    )
    lay.stimuli.parent.mkdir(parents=True)
    with h5py.File(lay.stimuli, "w") as h5:
        h5["imgBrick"] = np.random.default_rng(1).integers(0, 256, size=(50, 20, 20, 3), dtype=np.uint8)
    roi = -np.ones(SHAPE, dtype=np.int16)
    roi[1:5, 2:6, 3:8] = 0
    roi[2:4, 3:6, 4:7] = 1
    roi[5, 7, 8] = 1  # a lone voxel far from the block, so the bounding box is not the block
    for s in (1, 2):
        _write_nifti(lay.nsdgeneral(s), roi)
        for session in (1, 2, 3):
            vol = _betas(s, session)
            _write_nifti(lay.betas_nifti(s, session), vol)
            if h5_twin:
                _write_h5_twin(lay.betas_hdf5(s, session), vol)
        if responses:
            _write_responses(lay.responses(s), s)
    return lay, roi > 0


def _write_responses(path, subject, bad_row=None):
    order = _masterordering()
    lines = ["SUBJECT\tSESSION\tRUN\tTRIAL\t73KID\tISOLD"]
    for g, col in enumerate(order):
        img = SUBJECTIM[subject - 1, col - 1] + (1 if g == bad_row else 0)
        lines.append(f"{subject}\t{g // TPS + 1}\t{g % TPS // 3 + 1}\t{g % 3 + 1}\t{img}\t0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "nsd")


# ------------------------------------------------------------------------------------------ expdesign
def test_expdesign_keeps_file_values_and_counts_trials_from_stimpattern(tree):
    lay, _ = tree
    design = read_expdesign(lay.expdesign)
    np.testing.assert_array_equal(design.masterordering, _masterordering())
    np.testing.assert_array_equal(design.subjectim, SUBJECTIM)
    assert (design.trials_per_session, design.n_shared, design.n_sessions_max) == (TPS, 2, 3)


def test_expdesign_defaults_to_750_trials_and_reads_matlab_v73(tmp_path):
    order = np.tile(np.arange(1, 7), 250)  # 1500 trials, no stimpattern → 750 per session
    path = tmp_path / "v73.mat"
    with h5py.File(path, "w") as h5:  # MATLAB v7.3 = HDF5 with arrays stored transposed
        h5["masterordering"] = order[None].T
        h5["subjectim"] = SUBJECTIM.T
        h5["sharedix"] = SHAREDIX[None].T
    design = read_expdesign(path)
    assert (design.trials_per_session, design.n_sessions_max) == (750, 2)
    np.testing.assert_array_equal(design.subjectim, SUBJECTIM)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sharedix": None}, "lacks the variable 'sharedix'"),
        ({"masterordering": np.array([[1, 2, 7, 1, 2, 3]])}, r"1-based columns of subjectim \(1..6\)"),
        ({"sharedix": np.array([[10, 31]])}, "subject 1 are not the sharedix"),
        (
            {"stimpattern": np.where(np.arange(24).reshape(3, 2, 4) == 20, 0, 1)},
            r"unequal trials per session \[7, 8\]",
        ),
        ({"masterordering": np.array([[1, 2, 3, 4, 5]])}, "not a multiple of 6"),
    ],
)
def test_expdesign_inconsistencies_are_named(tmp_path, change, match):
    variables = {
        "masterordering": _masterordering()[None],
        "subjectim": SUBJECTIM,
        "sharedix": SHAREDIX[None],
        "stimpattern": _stimpattern(),
    } | change
    savemat(tmp_path / "e.mat", {k: v for k, v in variables.items() if v is not None})
    with pytest.raises(BrainITError, match=match):
        read_expdesign(tmp_path / "e.mat")


def test_expdesign_missing_or_garbage_file(tmp_path):
    with pytest.raises(BrainITError, match="not found"):
        read_expdesign(tmp_path / "none.mat")
    (tmp_path / "bad.mat").write_bytes(b"not a matlab file at all" * 10)
    with pytest.raises(BrainITError, match="bad.mat is not a readable MATLAB"):
        read_expdesign(tmp_path / "bad.mat")


# ------------------------------------------------------------------------------------------ trials
def test_trial_table_follows_masterordering(tree):
    lay, _ = tree
    reader = NSDReader(lay.root)
    assert reader.subjects() == [1, 2]
    assert reader.sessions(2) == [1, 2, 3]
    order = _masterordering()
    for subject in (1, 2):
        table = reader.trial_table(subject, [1, 2, 3])
        seen = {}
        for g in range(18):
            img = SUBJECTIM[subject - 1, order[g] - 1] - 1
            assert table["nsd_id"][g] == img
            assert table["shared"][g] == (img + 1 in SHAREDIX)
            assert (table["session"][g], table["trial"][g], table["global_trial"][g]) == (
                g // TPS + 1,
                g % TPS,
                g,
            )
            assert table["repeat"][g] == seen.get(img, 0)
            seen[img] = seen.get(img, 0) + 1
        assert sorted(seen.values()) == [3] * 6
    # a subset: global trials keep their place in the experiment, repeats count within the subset
    sub = reader.trial_table(1, [2, 3])
    np.testing.assert_array_equal(sub["global_trial"], np.arange(6, 18))
    assert sub["repeat"].max() <= 2 and (sub["repeat"] == 0).sum() == len(np.unique(sub["nsd_id"]))


def test_trial_table_refuses_bad_subject_session_and_responses(tree):
    lay, _ = tree
    reader = NSDReader(lay.root)
    with pytest.raises(BrainITError, match="subject 3 has no row in subjectim"):
        reader.trial_table(3, [1])
    with pytest.raises(BrainITError, match=r"sessions \[4\] are beyond the 3 sessions"):
        reader.trial_table(1, [1, 4])
    _write_responses(lay.responses(1), 1, bad_row=8)
    with pytest.raises(BrainITError, match=r"responses.tsv line 10 \(session 2, trial 2\): 73KID"):
        reader.trial_table(1, [1, 2, 3])
    reader.trial_table(1, [1])  # the bad row is in session 2: session 1 alone still agrees


# ------------------------------------------------------------------------------------------ betas
def test_roi_mask_and_voxel_table(tree):
    lay, roi = tree
    mask, affine = NSDReader(lay.root).roi_mask(1)
    np.testing.assert_array_equal(mask, roi)
    np.testing.assert_allclose(affine, AFFINE)
    ijk, xyz = NSDReader.voxel_table(mask, affine)
    assert ijk.shape == (int(roi.sum()), 3) and tuple(ijk[-1]) == (5, 7, 8)
    np.testing.assert_allclose(xyz[-1], [5 * 1.8 - 5, 7 * 1.8 + 3, 8 * 1.8 + 7], rtol=1e-6)


@pytest.mark.parametrize("prefer_hdf5", [True, False])
def test_session_betas_are_roi_values_over_300(tree, prefer_hdf5):
    lay, roi = tree
    if prefer_hdf5:  # make the twin differ by one unit so the test sees which file was read
        _write_h5_twin(lay.betas_hdf5(2, 3), _betas(2, 3) + 300)
    got = NSDReader(lay.root, prefer_hdf5=prefer_hdf5).session_betas(2, 3, roi)
    expected = _betas(2, 3)[roi].T / 300.0 + (1.0 if prefer_hdf5 else 0.0)  # (T, V)
    assert got.dtype == np.float32 and got.shape == (TPS, roi.sum())
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_session_betas_read_nifti_when_no_twin(tmp_path):
    lay, roi = make_tree(tmp_path, h5_twin=False, responses=False)
    got = NSDReader(lay.root).session_betas(1, 2, roi)
    np.testing.assert_allclose(got, _betas(1, 2)[roi].T / 300.0, rtol=1e-6)


def test_session_betas_errors_name_the_file(tree):
    lay, roi = tree
    reader = NSDReader(lay.root, prefer_hdf5=False)
    _write_nifti(lay.betas_nifti(1, 1), _betas(1, 1)[..., :5])
    with pytest.raises(BrainITError, match=r"betas_session01.nii.gz has 5 trials, expected 6"):
        reader.session_betas(1, 1, roi)
    _write_nifti(lay.betas_nifti(1, 2), np.zeros((7, 8, 10, TPS), np.int16))
    with pytest.raises(BrainITError, match=r"volume shape \(7, 8, 10\).*nsdgeneral mask has \(7, 8, 9\)"):
        reader.session_betas(1, 2, roi)
    vol = _betas(1, 3).astype(np.float32)
    vol[5, 7, 8, 2] = np.nan
    _write_nifti(lay.betas_nifti(1, 3), vol)
    with pytest.raises(BrainITError, match="betas_session03.nii.gz contains 1 NaN/inf"):
        reader.session_betas(1, 3, roi)
    vol = _betas(2, 1).astype(np.float32)
    vol[2, 3, 4, 0] = np.inf
    _write_h5_twin(lay.betas_hdf5(2, 1), vol)
    with pytest.raises(BrainITError, match="betas_session01.hdf5 contains 1 NaN/inf"):
        NSDReader(lay.root).session_betas(2, 1, roi)
    with pytest.raises(BrainITError, match="betas of subject 2 session 9 not found"):
        reader.session_betas(2, 9, roi)


def test_zscore_per_voxel_and_constant_voxels(caplog):
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 5))
    x[:, 2] = 1.7
    with caplog.at_level(logging.WARNING):
        z = zscore_session(x, "subject 1 session 4")
    np.testing.assert_allclose(z[:, [0, 1, 3, 4]].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z[:, [0, 1, 3, 4]].std(0), 1, atol=1e-5)
    np.testing.assert_allclose(z[:, 0], (x[:, 0] - x[:, 0].mean()) / x[:, 0].std(), rtol=1e-5)
    assert (z[:, 2] == 0).all()
    assert "subject 1 session 4: 1 voxel(s) have zero variance" in caplog.text


def test_ncsnr_is_read_at_roi_voxels(tree):
    lay, roi = tree
    reader = NSDReader(lay.root)
    assert reader.ncsnr(1, roi) is None
    vol = np.random.default_rng(2).random(SHAPE).astype(np.float32)
    _write_nifti(lay.ncsnr(1), vol)
    np.testing.assert_array_equal(reader.ncsnr(1, roi), vol[roi])


# ------------------------------------------------------------------------------------------ stimuli
def test_images_are_resized_channels_first(tree):
    lay, _ = tree
    reader = NSDReader(lay.root)
    assert reader.n_stimuli() == 50
    with h5py.File(lay.stimuli) as h5:
        brick = h5["imgBrick"][()]
    for ids in (np.array([3, 9, 41]), np.array([41, 3])):  # increasing, and not
        out = reader.images(ids)
        assert sorted(out) == [112, 224]
        for size in (224, 112):
            assert out[size].shape == (len(ids), 3, size, size) and out[size].dtype == np.uint8
            for n, i in enumerate(ids):
                ref = resize(brick[i], (size, size), order=3, anti_aliasing=True, preserve_range=True)
                r = np.corrcoef(out[size][n].transpose(1, 2, 0).ravel(), ref.ravel())[0, 1]
                assert r > 0.95, (i, size, r)
        # images are not mixed up: the first output image matches its own source best
        first = out[112][0].transpose(1, 2, 0).astype(float)
        scores = [np.corrcoef(first.ravel(), resize(b, (112, 112), order=3).ravel())[0, 1] for b in brick]
        assert int(np.argmax(scores)) == ids[0]


def test_missing_root():
    with pytest.raises(BrainITError, match="NSD root /nonexistent/nsd not found"):
        NSDReader("/nonexistent/nsd")
