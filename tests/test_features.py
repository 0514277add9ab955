"""The CLIP feature cache: extraction (exact tokens, resume, overwrite), its checks, and streaming it in batches."""

import shutil

import h5py
import numpy as np
import pytest
import torch

from brainit_pl.backbones.clip import CLIPTokens, build_clip
from brainit_pl.cli import main
from brainit_pl.data.cache import FeatureCache, cache_path, partial_path
from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.data.store import ImageStore, Store
from brainit_pl.data.store_writer import write_images
from brainit_pl.errors import BrainITError
from brainit_pl.features.extract import extract_features

BATCH = 8  # tiny store: 50 images → batches of 8 (the last one of 2)


@pytest.fixture(scope="module")
def extracted(tiny_store, tmp_path_factory):
    """A copy of the tiny store with its CLIP cache extracted by the tiny twin (uninterrupted). Read-only."""
    store = tmp_path_factory.mktemp("features") / "store"
    shutil.copytree(tiny_store, store)
    extract_features(store, tiny=True, batch_size=BATCH)
    return store


@pytest.fixture
def fresh(tiny_store, tmp_path):
    """A writable copy of the tiny store without a feature cache."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    return store


class CountingForward:
    """Patches CLIPTokens.forward: counts calls and images, and raises on call number ``fail_at``."""

    original = CLIPTokens.forward

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.images, self.fail_at = 0, 0, fail_at

        def forward(net, images):  # a plain function, so it binds to the module like the original
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("simulated crash")
            self.images += len(images)
            return CountingForward.original(net, images)

        monkeypatch.setattr(CLIPTokens, "forward", forward)


def _read(path):
    with h5py.File(path, "r") as h5:
        return h5["tokens"][()], h5["nsd_id"][()], h5["done"][()], dict(h5.attrs)


def test_cache_holds_the_tiny_clip_tokens_of_every_image(extracted):
    images = Store(extracted).images
    tokens, nsd_id, done, attrs = _read(cache_path(extracted))
    assert not partial_path(cache_path(extracted)).exists()
    np.testing.assert_array_equal(nsd_id, images.nsd_ids)
    assert tokens.dtype == np.float16 and tokens.shape == (len(images.nsd_ids), 256, 32)
    assert done.all()
    assert (attrs["backbone"], attrs["arch"], attrs["width"], attrs["n_tokens"]) == ("clip", "tiny", 32, 256)
    with h5py.File(cache_path(extracted), "r") as h5:
        assert h5["tokens"].chunks == (1, 256, 32)
    net = build_clip(tiny=True)
    pixels = torch.from_numpy(images.images(images.nsd_ids, size=224)).float() / 255.0
    with torch.no_grad():
        expected = net(pixels).numpy()  # (N, 256, 32) float32, every image in one batch
    np.testing.assert_allclose(tokens.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    # rows really are per image: no two images share tokens
    assert len({t.tobytes() for t in tokens}) == len(tokens)


def test_feature_cache_reads_in_the_order_given(extracted):
    images = Store(extracted).images
    cache = FeatureCache(cache_path(extracted), images)
    tokens, _, _, _ = _read(cache_path(extracted))
    ids = images.nsd_ids[[7, 2, 7, 40]]
    got = cache.tokens(ids)
    assert got.dtype == np.float16 and got.shape == (4, 256, 32)
    np.testing.assert_array_equal(got, tokens[[7, 2, 7, 40]])
    assert (cache.n_tokens, cache.width, cache.arch, len(cache)) == (256, 32, "tiny", len(images.nsd_ids))
    with pytest.raises(BrainITError, match="not in the feature cache"):
        cache.tokens([999_999])


def test_resume_computes_only_unfinished_images(extracted, fresh, monkeypatch):
    n = len(Store(fresh).images.nsd_ids)
    final, partial = cache_path(fresh), partial_path(cache_path(fresh))
    CountingForward(monkeypatch, fail_at=3)  # two batches succeed, the third forward raises
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(fresh, tiny=True, batch_size=BATCH)
    assert partial.is_file() and not final.exists()
    _, _, done, _ = _read(partial)
    assert done.sum() == 2 * BATCH and done[: 2 * BATCH].all()
    with pytest.raises(BrainITError, match="interrupted extraction left"):
        FeatureCache(final, Store(fresh).images)

    resumed = CountingForward(monkeypatch)
    assert extract_features(fresh, tiny=True, batch_size=BATCH) == final
    assert resumed.images == n - 2 * BATCH
    assert not partial.exists()
    np.testing.assert_array_equal(_read(final)[0], _read(cache_path(extracted))[0])

    again = CountingForward(monkeypatch)
    extract_features(fresh, tiny=True, batch_size=BATCH)  # finished and matching: nothing to do
    assert again.calls == 0
    extract_features(fresh, tiny=True, batch_size=BATCH, overwrite=True)
    assert again.images == n


def test_resume_with_other_weights_is_refused(fresh, monkeypatch):
    CountingForward(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError):
        extract_features(fresh, tiny=True, batch_size=BATCH)
    with pytest.raises(BrainITError, match=r"weights 'random \(seed 0\)', this run uses 'other.bin'"):
        extract_features(fresh, tiny=True, pretrained=fresh / "other.bin")
    assert partial_path(cache_path(fresh)).is_file()  # kept for a resume with the right options


def _change_first_image(store):
    with h5py.File(store / "images.h5", "r+") as h5:
        h5["images_224"][0] = 255 - h5["images_224"][0]


def test_cache_of_other_images_is_refused(extracted, fresh, stderr_lines):
    shutil.copy(cache_path(extracted), cache_path(fresh))
    FeatureCache(cache_path(fresh), Store(fresh).images)  # same images: fine
    _change_first_image(fresh)
    with pytest.raises(
        BrainITError, match=r"computed from other images: image fingerprint \w{12} \(stored\)"
    ):
        FeatureCache(cache_path(fresh), Store(fresh).images)
    with pytest.raises(BrainITError, match="--overwrite"):
        NSDDataModule(str(fresh), features=["clip"])
    assert main(["extract-features", "--store", str(fresh), "--tiny"]) == 2
    (line,) = stderr_lines()
    assert "computed from other images" in line and "pass --overwrite" in line
    assert main(["extract-features", "--store", str(fresh), "--tiny", "--overwrite"]) == 0
    FeatureCache(cache_path(fresh), Store(fresh).images)


def test_cache_of_another_size_is_refused(extracted, tmp_path):
    images = Store(extracted).images
    subset = images.nsd_ids[:-1]
    write_images(
        tmp_path / "images.h5", subset, lambda ids: {s: images.images(ids, size=s) for s in (224, 112)}
    )
    with pytest.raises(
        BrainITError, match=rf"holds features of {len(subset) + 1} images .* has {len(subset)}"
    ):
        FeatureCache(cache_path(extracted), ImageStore(tmp_path / "images.h5"))


def test_missing_cache_names_the_command(fresh):
    with pytest.raises(
        BrainITError, match=rf"run `brainit-pl extract-features --store {fresh} --backbone clip`"
    ):
        FeatureCache(cache_path(fresh), Store(fresh).images)
    with pytest.raises(BrainITError, match="no clip feature cache"):
        NSDDataModule(str(fresh), features=["clip"])
    with pytest.raises(BrainITError, match=r"features \['dino'\] unknown"):
        NSDDataModule(str(fresh), features=["dino"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_streams_clip_tokens(extracted, num_workers):
    dm = NSDDataModule(
        str(extracted),
        features=["clip"],
        image_sizes=[224],
        voxels_per_sample=16,
        batch_size=6,
        num_workers=num_workers,
        persistent_workers=False,
    )
    assert dm.feature_shapes == {"clip": (256, 32)}
    cache = FeatureCache(cache_path(extracted), Store(extracted).images)
    seen = 0
    for split in ("train", "test"):
        for batch in dm.make_dataloader(split):
            tokens = batch["clip_tokens"]
            assert tokens.dtype == torch.float32 and tokens.shape == (len(batch["nsd_id"]), 256, 32)
            expected = cache.tokens(batch["nsd_id"].numpy()).astype(np.float32)
            np.testing.assert_array_equal(tokens.numpy(), expected)
            seen += len(tokens)
    assert seen == len(dm.samples["train"]) + len(dm.samples["test"])
