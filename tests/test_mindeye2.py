"""MindEye2's release → the store, on a tiny twin written in the release's real formats.

The twin: ``betas_all_subj0X_fp32_renorm.hdf5`` (dataset ``betas``, float32, 750 rows per session),
``coco_images_224_float16.hdf5`` (dataset ``images``, float16), and webdataset tars whose samples are
``sample%09d.{behav,past_behav,future_behav,olds_behav}.npy`` as MindEye2's writer names them. Subject 1
has 7 voxels and 2 sessions, subject 2 has 9 voxels and 1 session, 13 images: unequal sizes so that an
axis mix-up fails.
"""

import io
import shutil
import tarfile

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainit_pl.data.mindeye2 import prepare_mindeye2, read_behav
from brainit_pl.data.store import Store
from brainit_pl.errors import BrainITError

N_IMAGES = 13
CHECKER_ID = 3  # an image of 1-pixel checkerboard: its 112² copy must be grey if anti-aliased
# subject -> (voxels, sessions, [(global trial, 73k id, shared)]); ids 0..2 play the shared images
SUBJECTS = {
    1: (
        7,
        2,
        [
            (5, 3, 0),
            (40, 4, 0),
            (41, 3, 0),
            (12, 0, 1),
            (700, 1, 1),
            (750, 5, 0),
            (900, 4, 0),
            (1200, 3, 0),
            (1499, 6, 0),
            (751, 0, 1),
            (1000, 2, 1),
        ],
    ),
    2: (9, 1, [(0, 7, 0), (9, 8, 0), (100, 7, 0), (3, 0, 1), (749, 1, 1)]),
}


def _behav(subject, g, nsd_id, shared):
    row = -np.ones((1, 17))  # float64 (1, 17), as MindEye2's writer makes it
    row[0, [0, 1, 2, 3, 4, 5, 16]] = [
        nsd_id,
        subject,
        g // 750 + 1,
        (g % 750) // 63 + 1,
        g % 63 + 1,
        g,
        shared,
    ]
    return row


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_shard(path, rows, first_key=0):
    """A webdataset tar: one sample per behav row, with MindEye2's four .npy members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for k, behav in enumerate(rows):
            members = {
                "behav.npy": behav,
                "past_behav.npy": -np.ones((15, 17)),
                "future_behav.npy": -np.ones((15, 17)),
                "olds_behav.npy": -np.ones((3, 17)),
            }
            for field, array in members.items():
                data = _npy(array)
                info = tarfile.TarInfo(f"sample{first_key + k:09d}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_release(root):
    """Write the twin; returns (betas per subject, images)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(N_IMAGES, 3, 224, 224)).astype(np.float16)
    yy, xx = np.mgrid[:224, :224]
    images[CHECKER_ID] = ((yy + xx) % 2).astype(np.float16)
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as h5:
        h5.create_dataset("images", data=images)
    betas = {}
    for s, (n_vox, n_sess, trials) in SUBJECTS.items():
        b = rng.normal(size=(750 * n_sess, n_vox)).astype(np.float32)
        b[-2] = np.nan  # a row no behav references: never read as a trial
        betas[s] = b
        with h5py.File(root / f"betas_all_subj0{s}_fp32_renorm.hdf5", "w") as h5:
            h5.create_dataset("betas", data=b)
        wds = root / f"wds/subj0{s}"
        rows = [(g, i, sh) for g, i, sh in trials]
        rng.shuffle(rows)  # shard order is not global-trial order
        for sess in range(n_sess):
            train = [_behav(s, g, i, sh) for g, i, sh in rows if not sh and g // 750 == sess]
            write_shard(wds / f"train/{sess}.tar", train, first_key=100 * sess)
        write_shard(wds / "new_test/0.tar", [_behav(s, g, i, sh) for g, i, sh in rows if sh])
    return betas, images


@pytest.fixture
def release(tmp_path):
    root, out = tmp_path / "mindeyev2", tmp_path / "store"
    root.mkdir()
    out.mkdir()
    betas, images = write_release(root)
    return root, out, betas, images


def test_store_matches_release(release):
    root, out, betas, images = release
    prepare_mindeye2(root, out, None)
    store = Store(out)
    assert store.subjects == [1, 2]
    assert store.manifest["source"]["kind"] == "mindeye2" and store.manifest["source"]["root"] == str(root)

    sub = store.subject(1)
    assert (sub.n_trials, sub.n_voxels, sub.space, sub.trials_per_session) == (11, 7, "mindeye2", 750)
    t = sub.trials
    g = [5, 12, 40, 41, 700, 750, 751, 900, 1000, 1200, 1499]
    np.testing.assert_array_equal(t["global_trial"], g)
    np.testing.assert_array_equal(t["nsd_id"], [3, 0, 4, 3, 1, 5, 0, 4, 2, 3, 6])
    np.testing.assert_array_equal(t["session"], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(t["trial"], [5, 12, 40, 41, 700, 0, 1, 150, 250, 450, 749])
    np.testing.assert_array_equal(t["shared"], [0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(t["repeat"], [0, 0, 0, 1, 0, 0, 1, 1, 0, 2, 0])
    expected = betas[1][g].astype(np.float16).astype(np.float32)  # stored as is, as float16
    np.testing.assert_array_equal(sub.betas(np.arange(11)), expected)
    np.testing.assert_array_equal(sub.ijk, np.stack([np.arange(7), -np.ones(7), -np.ones(7)], axis=1))
    assert not sub.xyz.any()

    sub2 = store.subject(2)
    assert (sub2.n_trials, sub2.n_voxels) == (5, 9)
    np.testing.assert_array_equal(sub2.trials["global_trial"], [0, 3, 9, 100, 749])
    np.testing.assert_array_equal(sub2.trials["repeat"], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(
        sub2.betas([4, 0]), betas[2][[749, 0]].astype(np.float16).astype(np.float32)
    )

    ids = np.arange(9)  # every id a trial of either subject uses; 9..12 are unused
    np.testing.assert_array_equal(store.images.nsd_ids, ids)
    x = images[ids].astype(np.float32)
    np.testing.assert_array_equal(store.images.images(ids, 224), np.rint(x * 255).astype(np.uint8))


def test_112_images_are_antialiased(release):
    root, out, _, images = release
    prepare_mindeye2(root, out, [1])
    small = Store(out).images.images(np.arange(7), 112).astype(int)  # subject 1 uses ids 0..6
    # An independent implementation (torch's anti-aliased bicubic, a = -0.5 like PIL's) agrees to a grey
    # level (PIL resamples the float image; torch differs only in float rounding)...
    x = torch.from_numpy(images[:7].astype(np.float32))
    ref = F.interpolate(x, size=(112, 112), mode="bicubic", antialias=True, align_corners=False)
    ref = np.rint(ref.clamp(0, 1).numpy() * 255).astype(int)
    assert np.abs(small - ref).max() <= 1
    # ...and a 1-pixel checkerboard becomes grey, where plain subsampling would give pure black.
    interior = small[CHECKER_ID][:, 3:-3, 3:-3]
    assert interior.min() >= 126 and interior.max() <= 129


def test_subject_subset_keeps_only_its_images(release):
    root, out, _, _ = release
    prepare_mindeye2(root, out, [2])
    store = Store(out)
    assert store.subjects == [2]
    assert sorted(p.name for p in out.iterdir()) == ["images.h5", "manifest.json", "subj02.h5"]
    np.testing.assert_array_equal(store.images.nsd_ids, [0, 1, 7, 8])


def _edit_betas(root, subject, row, value):
    with h5py.File(root / f"betas_all_subj0{subject}_fp32_renorm.hdf5", "a") as h5:
        h5["betas"][row, 2] = value


def _replace_test_shard(root, subject, rows):
    write_shard(root / f"wds/subj0{subject}/new_test/0.tar", rows)


BAD_RELEASES = {
    "subject not in release": (lambda r: None, [3], r"subject 3 is not in the MindEye2 release"),
    "no betas file at all": (
        lambda r: [p.unlink() for p in r.glob("betas_all_*")],
        None,
        r"no MindEye2 betas",
    ),
    "missing images": (
        lambda r: (r / "coco_images_224_float16.hdf5").unlink(),
        None,
        r"coco_images_224_float16.hdf5 not found",
    ),
    "missing test shard": (
        lambda r: (r / "wds/subj02/new_test/0.tar").unlink(),
        None,
        r"subj02/new_test/0.tar not found",
    ),
    "missing wds folder": (lambda r: shutil.rmtree(r / "wds/subj01"), [1], r"wds/subj01 not found"),
    "row outside betas": (
        lambda r: _replace_test_shard(r, 2, [_behav(2, 750, 0, 1)]),
        None,
        r"new_test/0.tar: behav points at betas row 750, outside the 750 rows of betas_all_subj02_fp32_renorm.hdf5",
    ),
    "image outside images": (
        lambda r: _replace_test_shard(r, 2, [_behav(2, 3, N_IMAGES, 1)]),
        None,
        r"gives image 13, outside the 13 rows of coco_images_224_float16.hdf5",
    ),
    "session disagrees with global trial": (
        lambda r: _replace_test_shard(r, 1, [np.where(np.arange(17) == 2, 1, _behav(1, 751, 0, 1))]),
        None,
        r"behav session 1 disagrees with global trial 751",
    ),
    "another subject's shard": (
        lambda r: _replace_test_shard(r, 1, [_behav(2, 12, 0, 1)]),
        None,
        r"behav rows of subject 2, expected 1",
    ),
    "trial twice": (
        lambda r: _replace_test_shard(r, 1, [_behav(1, 40, 4, 1)]),
        None,
        r"global trial 40 of subject 1 appears twice",
    ),
    "nan betas": (
        lambda r: _edit_betas(r, 1, 700, np.nan),
        None,
        r"subj01_fp32_renorm.hdf5: row 700 has NaN, inf",
    ),
    "inf betas": (lambda r: _edit_betas(r, 1, 5, np.inf), [1], r"row 5 has NaN, inf"),
    "corrupt shard": (
        lambda r: (r / "wds/subj01/train/1.tar").write_bytes(b"not a tar"),
        None,
        r"train/1.tar is not a readable webdataset shard",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RELEASES))
def test_bad_release_fails_before_the_manifest(release, case):
    root, out, _, _ = release
    edit, subjects, message = BAD_RELEASES[case]
    edit(root)
    with pytest.raises(BrainITError, match=message):
        prepare_mindeye2(root, out, subjects)
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file


def test_behav_shape_is_checked(tmp_path):
    write_shard(tmp_path / "0.tar", [np.zeros((2, 17))])
    with pytest.raises(BrainITError, match=r"sample000000000.behav.npy has shape \(2, 17\)"):
        read_behav(tmp_path / "0.tar")
    write_shard(tmp_path / "1.tar", [])
    with pytest.raises(BrainITError, match="holds no"):
        read_behav(tmp_path / "1.tar")
