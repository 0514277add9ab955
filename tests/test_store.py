import json

import h5py
import numpy as np
import pytest

from brainit_pl.data.store import FORMAT_VERSION, ImageStore, Store, repeat_index, subject_filename
from brainit_pl.data.store_writer import SubjectStoreWriter, resize_for_store, write_images, write_manifest
from brainit_pl.errors import BrainITError


def _trials(n):
    ids = np.arange(n) % 5
    return {
        "nsd_id": ids,
        "session": np.ones(n),
        "trial": np.arange(n),
        "global_trial": np.arange(n),
        "shared": ids < 2,
        "repeat": repeat_index(ids),
    }


def _write(root, subject=1, n=9, v=7):
    betas = np.random.default_rng(0).normal(size=(n, v)).astype(np.float32)
    with SubjectStoreWriter(
        root / subject_filename(subject),
        subject=subject,
        n_trials=n,
        n_voxels=v,
        space="func1pt8mm",
        trials_per_session=n,
    ) as w:
        w.write_betas(0, betas[:4])
        w.write_betas(4, betas[4:])
        w.write_trials(_trials(n))
        w.write_voxels(np.zeros((v, 3)), np.zeros((v, 3)))
    return betas


def test_round_trip_rows_in_given_order(tmp_path):
    betas = _write(tmp_path)
    images = lambda ids: {s: np.full((len(ids), 3, s, s), 7, np.uint8) for s in (224, 112)}  # noqa: E731
    write_images(tmp_path / "images.h5", np.array([4, 0, 2]), images)
    write_manifest(tmp_path, {1: {"file": "subj01.h5"}}, images={"file": "images.h5"}, source={})
    store = Store(tmp_path)
    sub = store.subject(1)
    assert (sub.n_trials, sub.n_voxels) == (9, 7)
    got = sub.betas([5, 1, 5])
    np.testing.assert_allclose(got, betas[[5, 1, 5]], atol=2e-3)
    assert list(sub.trials["repeat"][:6]) == [0, 0, 0, 0, 0, 1]
    assert store.images.images([2, 0], size=112).shape == (2, 3, 112, 112)
    with pytest.raises(BrainITError, match="not in the image store"):
        store.images.images([3])
    with pytest.raises(BrainITError, match="subject 2 is not in the store"):
        store.subject(2)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(BrainITError, match="NaN"):
        with SubjectStoreWriter(
            tmp_path / "subj01.h5",
            subject=1,
            n_trials=2,
            n_voxels=3,
            space="func1pt8mm",
            trials_per_session=2,
        ) as w:
            w.write_betas(0, np.array([[0, np.nan, 1], [1, 2, 3]]))
    with pytest.raises(BrainITError, match="never written"):
        with SubjectStoreWriter(
            tmp_path / "subj01.h5",
            subject=1,
            n_trials=2,
            n_voxels=3,
            space="func1pt8mm",
            trials_per_session=2,
        ) as w:
            w.write_trials(_trials(2))
            w.write_voxels(np.zeros((3, 3)), np.zeros((3, 3)))
    assert list(tmp_path.iterdir()) == []


def test_incompatible_version_is_refused(tmp_path):
    _write(tmp_path)
    with h5py.File(tmp_path / "subj01.h5", "a") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    write_manifest(tmp_path, {1: {"file": "subj01.h5"}}, images=None, source={})
    with pytest.raises(BrainITError, match="incompatible"):
        Store(tmp_path).subject(1)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "brainit-pl-store", "format_version": 0}))
    with pytest.raises(BrainITError, match="incompatible"):
        Store(tmp_path)


def test_native_256_copy_only_from_large_enough_sources(tmp_path):
    """256² (stage 2's VAE input) is written from the 425² NSD stimuli, never upsampled from small images."""
    rng = np.random.default_rng(0)
    large = rng.integers(0, 256, size=(2, 425, 425, 3), dtype=np.uint8)
    small = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    assert sorted(resize_for_store(large)) == [112, 224, 256]
    assert sorted(resize_for_store(small)) == [112, 224]
    for name, raw in (("large", large), ("small", small)):
        write_images(tmp_path / f"{name}.h5", np.array([3, 7]), lambda ids, raw=raw: resize_for_store(raw))
    images = ImageStore(tmp_path / "large.h5")
    assert images.sizes == (224, 112, 256) and images.images([7], size=256).shape == (1, 3, 256, 256)
    with pytest.raises(BrainITError, match="256² copy is written only"):
        ImageStore(tmp_path / "small.h5").images([7], size=256)
