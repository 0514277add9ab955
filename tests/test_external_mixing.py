"""External images with synthetic fMRI in the NSDDataModule's training batches (and extract-features on them).

The store is test_datamodule's hand-built one (voxel counts 7, 9, 11); the synthetic-fMRI folder is written
here through the real writer (``create_fmri_file``) with known betas, so every value a batch holds can be
checked against its source.
"""

import shutil

import h5py
import numpy as np
import pytest
import torch

from brainit_pl.backbones.clip import build_clip
from brainit_pl.cli import main
from brainit_pl.data.cache import FeatureCache, cache_path, image_fingerprint
from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.data.store import ImageStore, Store
from brainit_pl.data.store_writer import write_images
from brainit_pl.data.synthetic_store import IMAGES_FILE, create_fmri_file, fmri_path
from brainit_pl.errors import BrainITError
from brainit_pl.features.extract import extract_features
from test_datamodule import VOXELS, _build

N_EXT = 10  # external images
N_TRAIN = 3 * 6  # 3 subjects x (8 own images - 2 val images at val_fraction 0.25)


def _ext_image(rows, size):
    """A recognisable external image: every pixel = 250 - row (+ channel), unlike any store image."""
    base = (250 - np.asarray(rows)[:, None, None, None] + np.arange(3)[None, :, None, None]) % 256
    return np.broadcast_to(base, (len(rows), 3, size, size)).astype(np.uint8)


def _synthetic(root, voxels=VOXELS, seed=1):
    """A finished synthetic-fMRI folder with N_EXT images and random betas → {subject: (N, V_s) float32}."""
    root.mkdir(parents=True)
    write_images(root / IMAGES_FILE, np.arange(N_EXT), lambda b: {s: _ext_image(b, s) for s in (224, 112)})
    fingerprint = image_fingerprint(ImageStore(root / IMAGES_FILE))
    rng, betas = np.random.default_rng(seed), {}
    for s, v in voxels.items():
        attrs = {"subject": s, "n_voxels": v, "checkpoint_sha1": "0" * 40, "image_fingerprint": fingerprint}
        create_fmri_file(fmri_path(root, s), N_EXT, v, {**attrs, "checkpoint": "test.ckpt"})
        betas[s] = rng.normal(size=(N_EXT, v)).astype(np.float16)
        with h5py.File(fmri_path(root, s), "r+") as h5:
            h5["betas"][...] = betas[s]
            h5["done"][...] = True
    return {s: b.astype(np.float32) for s, b in betas.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(store, synthetic folder, its betas); both with a tiny-CLIP feature cache. Read-only."""
    tmp = tmp_path_factory.mktemp("external")
    (tmp / "store").mkdir()
    _build(tmp / "store")
    betas = _synthetic(tmp / "synthetic")
    extract_features(tmp / "store", tiny=True, device="cpu")
    extract_features(tmp / "synthetic", tiny=True, device="cpu")
    return tmp / "store", tmp / "synthetic", betas


def _dm(data, **kwargs):
    store, synthetic, _ = data
    args = {"external": str(synthetic), "voxels_per_sample": 5, "batch_size": 8, "val_fraction": 0.25}
    return NSDDataModule(str(store), **{**args, **kwargs})


def _epoch(dm, split="train", epoch=0, **kwargs):
    loader = dm.make_dataloader(split, **kwargs)
    loader.sampler.set_epoch(epoch)
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


@pytest.mark.parametrize("ratio", [3.0, 0.5])
def test_every_real_sample_once_and_round_ratio_external_per_epoch(data, ratio):
    dm = _dm(data, external_ratio=ratio)
    dm.setup("fit")
    assert len(dm.samples["train"]) == N_TRAIN
    batches = _epoch(dm)
    external = _cat(batches, "external")
    assert external.dtype == torch.bool and int(external.sum()) == round(ratio * N_TRAIN)
    real = [
        (int(s), int(n))
        for s, n in zip(_cat(batches, "subject")[~external], _cat(batches, "nsd_id")[~external])
    ]
    t = dm.samples["train"]
    assert sorted(real) == sorted(zip(t.subject.tolist(), t.nsd_id.tolist()))
    assert len(batches) == len(dm.make_dataloader("train")) == -(-len(external) // 8)
    # shuffled together: real and external samples share batches
    assert any(b["external"].any() and not b["external"].all() for b in batches)


def test_concat_mode_shows_every_external_image_once_per_epoch(data):
    """external_mode concat (the authors' base trainings): an epoch is every real sample once plus every
    external image once, each with a subject drawn anew every epoch; external_ratio plays no part."""
    _, _, betas = data
    dm = _dm(data, external_mode="concat", external_ratio=7.0)
    dm.setup("fit")
    subjects = []
    for epoch in (0, 1):
        batches = _epoch(dm, epoch=epoch)
        external = _cat(batches, "external")
        assert int((~external).sum()) == N_TRAIN and int(external.sum()) == N_EXT
        rows = sorted((-1 - _cat(batches, "nsd_id")[external]).tolist())
        assert rows == list(range(N_EXT))
        for b in batches:  # the betas are the slot's subject's synthetic ones for that image
            for i in np.flatnonzero(b["external"]).tolist():
                s, row = int(b["subject"][i]), -1 - int(b["nsd_id"][i])
                local = b["voxel_ids"][i].numpy() - dm.voxel_offsets[s]
                np.testing.assert_array_equal(b["betas"][i].numpy(), betas[s][row, local])
        order = np.argsort(-1 - _cat(batches, "nsd_id")[external].numpy())
        subjects.append(_cat(batches, "subject")[external].numpy()[order])
    assert not np.array_equal(*subjects)  # the subject of an image is drawn again every epoch
    with pytest.raises(BrainITError, match="external_mode"):
        _dm(data, external_mode="mix")


def test_external_samples_hold_the_synthetic_values(data):
    _, _, betas = data
    dm = _dm(data, image_sizes=[112], external_ratio=4.0)
    batches = _epoch(dm)
    pairs = set()
    for b in batches:
        for i in np.flatnonzero(b["external"]).tolist():
            s, row = int(b["subject"][i]), -1 - int(b["nsd_id"][i])
            assert 0 <= row < N_EXT and b["n_repeats"][i] == 1
            local = b["voxel_ids"][i].numpy() - dm.voxel_offsets[s]
            assert ((local >= 0) & (local < VOXELS[s])).all()  # global ids, inside the subject's range
            np.testing.assert_array_equal(b["betas"][i].numpy(), betas[s][row, local])
            np.testing.assert_allclose(b["image_112"][i, 2], (250 - row + 2) / 255.0)
            pairs.add((s, row))
        for i in np.flatnonzero(~b["external"]).tolist():
            assert b["nsd_id"][i] >= 0 and b["image_112"][i, 0, 0, 0] == (int(b["nsd_id"][i]) % 256) / 255.0
    # both draws are uniform: 72 slots cover every subject and most of the 10 images
    assert {s for s, _ in pairs} == set(VOXELS) and len({r for _, r in pairs}) >= 8
    for key, dtype in (("betas", torch.float32), ("voxel_ids", torch.int64), ("subject", torch.int64)):
        assert batches[0][key].dtype == dtype


def test_batches_depend_on_seed_and_epoch_only(data):
    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)

    first = _epoch(_dm(data))
    assert same(first, _epoch(_dm(data, num_workers=2, persistent_workers=False)))
    assert same(first, _epoch(_dm(data)))
    second = _epoch(_dm(data), epoch=1)
    assert not same(first, second)
    draws = [
        [(int(s), int(n)) for b in e for s, n in zip(b["subject"], b["nsd_id"]) if n < 0]
        for e in (first, second)
    ]
    assert len(draws[0]) == len(draws[1]) and draws[0] != draws[1]  # new images and subjects every epoch


def test_ddp_shards_split_the_slots(data):
    dm = _dm(data, batch_size=4)
    shards = [_epoch(dm, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert sum(int(_cat(sh, "external").sum()) for sh in shards) == 3 * N_TRAIN
    real = [int(n) for sh in shards for n in _cat(sh, "nsd_id") if n >= 0]
    assert len(real) == N_TRAIN


def test_val_and_test_never_hold_external_samples(data):
    dm = _dm(data, eval_batch_size=5)
    dm.setup()
    for split in ("val", "test"):
        batches = _epoch(dm, split)
        assert sum(len(b["nsd_id"]) for b in batches) == len(dm.samples[split]) > 0
        for b in batches:
            assert b["external"].dtype == torch.bool and not b["external"].any() and (b["nsd_id"] >= 0).all()
    store, _, _ = data
    plain = NSDDataModule(str(store), voxels_per_sample=5, batch_size=8, val_fraction=0.25)
    batches = _epoch(plain)
    assert not _cat(batches, "external").any() and len(_cat(batches, "external")) == N_TRAIN


def test_clip_tokens_of_external_samples_come_from_the_external_cache(data):
    store, synthetic, _ = data
    dm = _dm(data, features=["clip"])
    real_cache = FeatureCache(cache_path(store), Store(store).images)
    ext_cache = FeatureCache(cache_path(synthetic), ImageStore(synthetic / IMAGES_FILE))
    n_ext = 0
    for b in _epoch(dm):
        tokens, ext = b["clip_tokens"], b["external"]
        assert tokens.dtype == torch.float32 and tokens.shape == (len(ext), 256, 32)
        rows = (-1 - b["nsd_id"][ext]).numpy()
        np.testing.assert_array_equal(tokens[ext].numpy(), ext_cache.tokens(rows).astype(np.float32))
        real = real_cache.tokens(b["nsd_id"][~ext].numpy()).astype(np.float32)
        np.testing.assert_array_equal(tokens[~ext].numpy(), real)
        n_ext += int(ext.sum())
    assert n_ext == 3 * N_TRAIN


def test_extract_features_on_a_synthetic_folder(data, tmp_path, stderr_lines):
    _, synthetic, _ = data
    with h5py.File(cache_path(synthetic), "r") as h5:
        tokens, ids = h5["tokens"][()], h5["nsd_id"][()]
    assert ids.tolist() == list(range(N_EXT)) and h5py.is_hdf5(synthetic / IMAGES_FILE)
    pixels = torch.from_numpy(_ext_image(np.arange(N_EXT), 224)).float() / 255.0
    with torch.no_grad():
        expected = build_clip(tiny=True)(pixels).numpy()  # (N, 256, 32)
    np.testing.assert_allclose(tokens.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    # the CLI on a copy without a cache writes the same cache
    copy = tmp_path / "synthetic"
    shutil.copytree(synthetic, copy, ignore=shutil.ignore_patterns("features_*"))
    assert main(["extract-features", "--store", str(copy), "--tiny", "--device", "cpu"]) == 0
    with h5py.File(cache_path(copy), "r") as h5:
        np.testing.assert_array_equal(h5["tokens"][()], tokens)
    # a folder with neither a manifest nor images.h5 keeps the store's error
    (tmp_path / "empty").mkdir()
    assert main(["extract-features", "--store", str(tmp_path / "empty"), "--tiny"]) == 2
    (line,) = stderr_lines()
    assert "is not a brainit-pl store (no manifest.json)" in line


def test_user_errors_are_one_line(data, tmp_path):
    store, synthetic, _ = data
    _synthetic(tmp_path / "two", voxels={1: 7, 2: 9})
    _synthetic(tmp_path / "wrong", voxels={**VOXELS, 3: 10})
    shutil.copytree(synthetic, tmp_path / "nocache", ignore=shutil.ignore_patterns("features_*"))
    cases = [
        (lambda: _dm(data, voxels_per_sample=None), "external images need voxels_per_sample"),
        (
            lambda: _dm(data, external=str(tmp_path / "two")),
            rf"subject 3 has no synthetic fMRI in {tmp_path / 'two'} \(it has subjects \[1, 2\]\); "
            rf"run `brainit-pl synthesize-fmri --checkpoint ENCODER.ckpt --store {store} --out",
        ),
        (
            lambda: _dm(data, external=str(tmp_path / "wrong")),
            rf"subject 3 has 11 voxels in the store {store} but 10 in {fmri_path(tmp_path / 'wrong', 3)}; "
            "re-run `brainit-pl synthesize-fmri",
        ),
        (
            lambda: _dm(data, external=str(tmp_path / "nocache"), features=["clip"]),
            rf"no clip feature cache at {cache_path(tmp_path / 'nocache')}; "
            rf"run `brainit-pl extract-features --store {tmp_path / 'nocache'} --backbone clip` first",
        ),
        (lambda: _dm(data, external=str(tmp_path)), "no synthetic-fMRI images at"),
        (lambda: _dm(data, external_ratio=-1.0), "external_ratio must be finite and >= 0"),
    ]
    for make, pattern in cases:
        with pytest.raises(BrainITError, match=pattern) as err:
            make()
        assert "\n" not in str(err.value)
    # the two-subject folder serves a DataModule of those subjects; without features no cache is needed
    dm = _dm(data, external=str(tmp_path / "two"), subjects=[1, 2])
    assert set(_cat(_epoch(dm), "subject").tolist()) == {1, 2}
    _dm(data, external=str(tmp_path / "nocache"))
