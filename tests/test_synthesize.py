"""`brainit-pl synthesize-fmri`: betas equal the encoder's, resume, leakage refusal, truth score, reader."""

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from brainit_pl.cli import main
from brainit_pl.data.sim.stimuli import make_external_images
from brainit_pl.data.store import Store
from brainit_pl.data.synthetic_store import SyntheticFMRI, fmri_path
from brainit_pl.errors import BrainITError
from brainit_pl.features.synthesize import score_against_truth, synthesize_fmri
from brainit_pl.lit.encoder import EncoderModule
from brainit_pl.models.encoder import UniversalEncoder

CONFIG = str(Path(__file__).parents[1] / "configs" / "encoder_tiny.yaml")
ORIGINAL_TOKENS = UniversalEncoder.tokens
N_IMAGES, BATCH = 7, 3  # 7 = 3 + 3 + 1: a short last batch


@pytest.fixture(scope="module")
def checkpoint(tiny_store, tmp_path_factory):
    """A tiny encoder trained for one epoch through the CLI (a few seconds)."""
    root = tmp_path_factory.mktemp("encoder")
    args = [
        "fit",
        "--config",
        CONFIG,
        "--data.store",
        str(tiny_store),
        "--trainer.default_root_dir",
        str(root),
    ]
    assert main([*args, "--trainer.max_epochs", "1", "--trainer.logger", "false"]) == 0
    return sorted(root.rglob("last.ckpt"))[0]


@pytest.fixture(scope="module")
def synthetic(checkpoint, tiny_store, tmp_path_factory):
    """An uninterrupted run on the simulated external images."""
    out = tmp_path_factory.mktemp("synthetic") / "out"
    return synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES, batch_size=BATCH)


class _CountingTokens:
    """Replaces UniversalEncoder.tokens: counts the images it sees; raises after ``crash_after`` calls."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.calls, self.images, self.crash_after = 0, 0, crash_after

    def __call__(self, enc, images):
        if self.crash_after is not None and self.calls == self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.images += len(images)
        return ORIGINAL_TOKENS(enc, images)

    def install(self, monkeypatch) -> "_CountingTokens":
        # a plain function, so that it binds as a method (a callable instance would not)
        monkeypatch.setattr(UniversalEncoder, "tokens", lambda enc, images: self(enc, images))
        return self


def test_betas_equal_the_encoder_prediction_of_every_voxel(synthetic, checkpoint, tiny_nsd):
    reader = SyntheticFMRI(synthetic)
    module = EncoderModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert reader.subjects == sorted(module.encoder.n_voxels) and reader.n_images == N_IMAGES
    # the stored 224² images are the simulator's external images, resized like the tree's stimuli
    raw, _ = make_external_images(N_IMAGES, seed=0, size=64)  # tiny_nsd: seed 0, 64² stimuli
    expected = np.stack(
        [np.asarray(Image.fromarray(im).resize((224, 224), Image.Resampling.BICUBIC)) for im in raw]
    )
    stored = reader.images(np.arange(N_IMAGES), size=224)
    np.testing.assert_array_equal(stored, expected.transpose(0, 3, 1, 2))
    assert reader.images([2, 0], size=112).shape == (2, 3, 112, 112)
    x = torch.from_numpy(stored).float() / 255.0
    for subject, n_voxels in module.encoder.n_voxels.items():
        with h5py.File(fmri_path(synthetic, subject), "r") as h5:
            assert h5["betas"].dtype == np.float16 and h5["betas"].shape == (N_IMAGES, n_voxels)
            assert h5["betas"].chunks == (1, n_voxels)
            assert h5["image_id"][()].tolist() == list(range(N_IMAGES)) and h5["done"][()].all()
            assert h5.attrs["subject"] == subject and len(h5.attrs["checkpoint_sha1"]) == 40
        want = module.predict_voxels(x, subject).numpy()  # (N, V_s)
        got = reader.betas(subject, np.arange(N_IMAGES))
        assert got.dtype == np.float32 and got.shape == (N_IMAGES, n_voxels)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        np.testing.assert_array_equal(reader.betas(subject, [4, 1, 4]), got[[4, 1, 4]])  # order, duplicates


def test_correlation_with_the_true_responses_is_computed(synthetic, checkpoint, tiny_store, tiny_nsd, capsys):
    scores = score_against_truth(synthetic, tiny_nsd)
    assert set(scores) == set(SyntheticFMRI(synthetic).subjects)
    assert all(np.isfinite(r) and -1 <= r <= 1 for r in scores.values())
    logging.getLogger(__name__).warning("synthetic vs true median voxel r: %s", scores)
    # the job logs the same numbers (here on the finished output: nothing is recomputed)
    args = [
        "synthesize-fmri",
        "--checkpoint",
        str(checkpoint),
        "--store",
        str(tiny_store),
        "--out",
        str(synthetic),
    ]
    assert main([*args, "--n-images", str(N_IMAGES)]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err
    for subject, r in scores.items():
        assert f"subject {subject}: median voxel r(synthetic, true response) = {r:.3f}" in err
    with pytest.raises(BrainITError, match="truth of"):
        score_against_truth(synthetic, _other_seed(tiny_nsd, synthetic.parent))


def _other_seed(sim_root: Path, tmp: Path) -> Path:
    """A copy of the simulation's truth.json claiming another seed (its truth describes other images)."""
    meta = json.loads((sim_root / "simulation" / "truth.json").read_text())
    (tmp / "other" / "simulation").mkdir(parents=True, exist_ok=True)
    (tmp / "other" / "simulation" / "truth.json").write_text(json.dumps({**meta, "seed": meta["seed"] + 1}))
    return tmp / "other"


def test_resume_after_a_crash_computes_only_the_rest(
    synthetic, checkpoint, tiny_store, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _CountingTokens(crash_after=1).install(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES, batch_size=BATCH)
    subjects = SyntheticFMRI(synthetic).subjects
    for s in subjects:
        assert not fmri_path(out, s).exists()
        with h5py.File(out / f"fmri_subj{s:02d}.h5.partial", "r") as h5:
            assert h5["done"][()].tolist() == [True] * BATCH + [False] * (N_IMAGES - BATCH)
    resume = _CountingTokens().install(monkeypatch)
    synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES, batch_size=BATCH)
    assert resume.images == N_IMAGES - BATCH  # one backbone pass per missing image, for all subjects
    a, b = SyntheticFMRI(out), SyntheticFMRI(synthetic)
    for s in subjects:
        np.testing.assert_array_equal(a.betas(s, np.arange(N_IMAGES)), b.betas(s, np.arange(N_IMAGES)))
    a.close()
    again = _CountingTokens().install(monkeypatch)
    synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES, batch_size=BATCH)
    assert again.calls == 0  # a finished matching output is left alone
    with pytest.raises(BrainITError, match="holds another image set"):
        synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES + 1)
    with h5py.File(fmri_path(out, subjects[0]), "r+") as h5:
        h5.attrs["checkpoint_sha1"] = "0" * 40  # as if made by another checkpoint
    with pytest.raises(BrainITError, match="checkpoint_sha1"):
        synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES)
    synthesize_fmri(checkpoint, tiny_store, out, n_images=N_IMAGES, overwrite=True)
    assert SyntheticFMRI(out).n_images == N_IMAGES


def _shared(store_root: Path) -> tuple[int, np.ndarray]:
    store = Store(store_root)
    subj = store.subject(store.subjects[0])
    nsd_id = int(subj.trials["nsd_id"][subj.trials["shared"]][0])
    return nsd_id, store.images.images([nsd_id], size=224)[0]  # (3, 224, 224) uint8


def _image_set(path: Path, images: np.ndarray, nsd_ids: np.ndarray | None = None) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("images", data=(images.astype(np.float32) / 255.0).astype(np.float16))
        if nsd_ids is not None:
            h5.create_dataset("nsd_ids", data=nsd_ids)
    return path


def test_an_hdf5_set_holding_a_test_image_is_refused(checkpoint, tiny_store, tmp_path, stderr_lines):
    nsd_id, pixels = _shared(tiny_store)
    rng = np.random.default_rng(0)
    others = rng.integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    by_pixels = _image_set(tmp_path / "by_pixels.h5", np.concatenate([others, pixels[None]]))
    by_id = _image_set(tmp_path / "by_id.h5", others, np.array([-1, nsd_id, -1]))
    for path, why in (
        (by_pixels, "pixel copy of shared (test) NSD image"),
        (by_id, "is shared (test) NSD image"),
    ):
        out = tmp_path / f"out_{path.stem}"
        args = ["synthesize-fmri", "--checkpoint", str(checkpoint), "--store", str(tiny_store)]
        assert main([*args, "--images-hdf5", str(path), "--out", str(out)]) == 2
        (line,) = stderr_lines()
        assert why in line and f"{nsd_id}" in line
        assert not out.exists()
    # the same images without the test image are accepted (float16 → uint8 round trip is exact)
    ok = synthesize_fmri(
        checkpoint, tiny_store, tmp_path / "ok", images_hdf5=_image_set(tmp_path / "ok.h5", others)
    )
    reader = SyntheticFMRI(ok)
    np.testing.assert_array_equal(reader.images(np.arange(3), size=224), others)
    assert reader.betas(reader.subjects[0], [0, 1, 2]).shape[0] == 3


def test_bad_checkpoint_is_one_line(tiny_store, tmp_path, stderr_lines):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["synthesize-fmri", "--checkpoint", str(bad), "--store", str(tiny_store)]) == 2
    (line,) = stderr_lines()
    assert "not an EncoderModule checkpoint" in line
    assert (
        main(["synthesize-fmri", "--checkpoint", str(bad), "--store", str(tiny_store), "--n-images", "0"])
        == 2
    )
    assert stderr_lines() == ["brainit-pl synthesize-fmri: error: --n-images must be at least 1, got 0"]
    assert not (Path(tiny_store) / "synthetic").exists()
