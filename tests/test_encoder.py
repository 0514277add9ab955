"""The Universal Brain Encoder: shapes, what trains, adapters, loss, shift, chunking, metrics, and `fit` end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.lit.encoder import EncoderModule, VoxelCorrelation, summarize
from brainit_pl.models.encoder import UniversalEncoder, encoder_loss, random_shift

CONFIG = str(Path(__file__).parents[1] / "configs" / "encoder_tiny.yaml")
N_VOXELS = {1: 37, 3: 29}  # unequal on purpose; subject 3's global ids start at 37
TINY = dict(tiny=True, token_dim=8, embed_dim=256, voxel_chunk=None)


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _encoder(**kw):
    torch.manual_seed(0)
    return UniversalEncoder(N_VOXELS, **{**TINY, **kw})


def test_forward_shapes_and_voxel_table(images):
    enc = _encoder().eval()
    with torch.no_grad():
        per_sample = enc(images, torch.randint(0, 66, (3, 11)))
        shared = enc(images, torch.arange(40, 47))
    assert per_sample.shape == (3, 11) and shared.shape == (3, 7)
    assert enc.voxel_embed.weight.shape == (66, 256)
    assert enc.voxel_embed.weight is enc.readout.voxel_embed  # one table, two names
    assert enc.subject_voxel_ids(3).tolist() == list(range(37, 66))
    with pytest.raises(BrainITError, match="subject 2 is not in this encoder"):
        enc.subject_voxel_ids(2)


def test_gradients_reach_the_trainable_parts_only(images):
    module = EncoderModule(N_VOXELS, **TINY, dropout=0.0)
    enc = module.encoder
    # Up-projections start at zero, so at init only they (not the down-projections) get a gradient.
    torch.nn.init.normal_(enc.adapters[0].up.weight, std=1.0)
    module(images[:2], torch.tensor([[0, 5, 40], [3, 3, 65]])).square().sum().backward()
    assert all(a.up.weight.grad.abs().sum() > 0 for a in enc.adapters)
    assert enc.adapters[0].down.weight.grad.abs().sum() > 0  # its up-projection is no longer zero
    assert enc.adapters[1].down.weight.grad.abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.project.parameters())
    assert enc.readout.feat_embed.grad.abs().sum() > 0
    assert enc.voxel_embed.weight.grad.abs().sum(1).nonzero().flatten().tolist() == [0, 3, 5, 40, 65]
    assert all(p.grad is None and not p.requires_grad for p in enc.backbone.net.parameters())
    keys = module.state_dict().keys()
    assert "encoder.voxel_embed.weight" in keys
    assert not [k for k in keys if "blocks" in k or "patch_embed" in k or "metrics" in k]
    frozen = {id(p) for p in enc.backbone.net.parameters()}
    assert not frozen & {id(p) for p in module.parameters()}  # the optimizer never sees DINOv2
    names = {n.split(".")[1] for n, _ in module.named_parameters()}
    assert names == {"adapters", "project", "readout"}  # voxel_embed is the readout's table, counted once


def test_zero_init_adapters_leave_the_backbone_unchanged(images):
    enc = _encoder()
    with torch.no_grad():
        adapted = enc.backbone(images, adapters=enc.adapters)
        plain = enc.backbone(images)
    torch.testing.assert_close(adapted, plain, rtol=0, atol=0)
    torch.nn.init.normal_(enc.adapters[2].up.weight)
    with torch.no_grad():
        assert not torch.allclose(enc.backbone(images, adapters=enc.adapters), plain)


def test_lora_adapters_act_on_each_block_output(images):
    module = EncoderModule(N_VOXELS, **TINY, adapter="lora", dropout=0.0)
    enc = module.encoder
    assert all(a.down.bias is None and a.up.bias is None for a in enc.adapters)
    assert all(a.scale == pytest.approx(0.01 / 7) for a in enc.adapters)
    with torch.no_grad():  # down-projections start at zero: the frozen backbone exactly
        torch.testing.assert_close(
            enc.backbone(images, adapters=enc.adapters), enc.backbone(images), rtol=0, atol=0
        )
    # at init only the down-projections get a gradient (the up-projections see zeros)
    module(images[:2], torch.tensor([[0, 5, 40], [3, 3, 65]])).square().sum().backward()
    assert all(a.down.weight.grad.abs().sum() > 0 and a.up.weight.grad.abs().sum() == 0 for a in enc.adapters)
    # the wiring (on each block's output, taps see the adapted tokens) is pinned by
    # tests/test_encoder_adapter_reference.py against the authors' encoder
    with pytest.raises(BrainITError, match="adapter must be one of"):
        UniversalEncoder(N_VOXELS, **TINY, adapter="prefix")


def test_loss_matches_hand_computation():
    pred = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 2.0], [0.0, -1.0, 1.0]])
    mse = (0 + 1 + 0 + 0 + 4 + 0) / 6
    cos = ((1 + 4) / (5**0.5 * 6**0.5) + (-1 + 1) / (2**0.5 * 2**0.5)) / 2
    loss, got_mse, got_cos = encoder_loss(pred, target, cos_weight=0.1)
    assert got_mse.item() == pytest.approx(mse) and got_cos.item() == pytest.approx(cos)
    assert loss.item() == pytest.approx(mse - 0.1 * cos)


def test_shift_moves_each_image_by_at_most_three_pixels():
    h, w = 20, 23
    x = torch.arange(4 * 2 * h * w, dtype=torch.float32).view(4, 2, h, w)  # every pixel unique
    shifted = random_shift(x, 3, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape
    found = []
    for i in range(4):
        inner = shifted[i, :, 3:-3, 3:-3]
        matches = [
            (dy, dx)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if torch.equal(inner, x[i, :, 3 + dy : h - 3 + dy, 3 + dx : w - 3 + dx])
        ]
        assert len(matches) == 1, f"image {i} is not a shift of at most 3 px"
        found.append(matches[0])
    assert len(set(found)) > 1  # offsets differ per image
    assert torch.equal(random_shift(x, 0), x)


def test_replicate_shift_fills_the_border_with_edge_pixels():
    """The authors' shift (scipy.ndimage.shift, order 0, mode nearest): every pixel is an input pixel at
    the offset position, clamped to the image, so the uncovered border repeats the edge."""
    h, w = 9, 11
    x = torch.arange(2 * h * w, dtype=torch.float32).view(1, 2, h, w)
    torch.manual_seed(0)
    for _ in range(10):
        shifted = random_shift(x, 3, padding="replicate")
        matches = []
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                rows = (torch.arange(h) + dy).clamp(0, h - 1)
                cols = (torch.arange(w) + dx).clamp(0, w - 1)
                if torch.equal(shifted, x[:, :, rows][:, :, :, cols]):
                    matches.append((dy, dx))
        assert len(matches) == 1


def test_shift_padding_is_checked():
    with pytest.raises(BrainITError, match="padding"):
        random_shift(torch.zeros(1, 3, 8, 8), 3, padding="zeros")


def test_voxel_chunks_give_the_same_predictions(images):
    whole = _encoder().eval()
    chunked = _encoder(voxel_chunk=4).eval()
    chunked.load_state_dict(whole.state_dict())
    ids = torch.randint(0, 66, (3, 15))
    with torch.no_grad():
        torch.testing.assert_close(chunked(images, ids), whole(images, ids), rtol=0, atol=1e-6)


def test_predict_voxels_is_every_voxel_of_a_subject(images):
    module = EncoderModule(N_VOXELS, **{**TINY, "voxel_chunk": 10})
    module.train()
    out = module.predict_voxels(images, 3)
    assert out.shape == (3, 29) and module.training  # eval inside, mode restored
    with torch.no_grad():
        torch.testing.assert_close(out, module.eval()(images, torch.arange(37, 66)), rtol=0, atol=1e-6)


def test_voxel_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    target[:, 1] = 2 * pred[:, 1] + 1  # r = 1
    ids = torch.tensor([4, 0, 2, 6, 5])
    metric = VoxelCorrelation(8)
    t = torch.from_numpy
    metric.update(t(pred[:4]), t(target[:4]), ids, torch.full((4,), 3))
    metric.update(t(pred[4:]), t(target[4:]), ids.expand(5, -1), torch.full((5,), 1))  # two updates
    r = metric.compute()
    want = [np.corrcoef(pred[:, j], target[:, j])[0, 1] for j in range(5)]
    np.testing.assert_allclose(r[ids].numpy(), want, atol=1e-10)
    assert torch.isnan(r[[1, 3, 7]]).all()  # never seen
    # NC = snr² / (snr² + mean 1/n): 4 images averaged over 3 trials, 5 single trials
    nc = metric.noise_ceiling(torch.full((8,), 0.5))
    mean_inv = (4 / 3 + 5) / 9
    assert nc[0].item() == pytest.approx(0.25 / (0.25 + mean_inv))
    summary = summarize(r, nc)
    assert summary["voxel_corr_median"] == pytest.approx(np.median(want))
    assert summary["voxel_corr_p75"] == pytest.approx(np.percentile(want, 75))
    assert summary["noise_ceiling_fraction"] == pytest.approx(np.median(np.square(want)) / nc[0].item())


def test_fit_through_the_cli(tiny_store, tmp_path):
    code = main(
        [
            "fit",
            "--config",
            CONFIG,
            "--data.store",
            str(tiny_store),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs",
            "2",
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    ckpt = torch.load(sorted(tmp_path.rglob("last.ckpt"))[0], map_location="cpu", weights_only=False)
    n_voxels = ckpt["hyper_parameters"]["n_voxels"]
    assert set(n_voxels) == {1, 2}
    assert ckpt["state_dict"]["encoder.voxel_embed.weight"].shape == (sum(n_voxels.values()), 256)
    (csv,) = tmp_path.rglob("metrics.csv")
    header = csv.read_text().splitlines()[0].split(",")
    assert {"val/voxel_corr_median", "val/voxel_corr_p75", "val/noise_ceiling_fraction"} <= set(header)
    assert {"train/loss", "train/mse", "train/cos"} <= set(header)
    rows = [dict(zip(header, line.split(","))) for line in csv.read_text().splitlines()[1:]]
    p75 = [float(r["val/voxel_corr_p75"]) for r in rows if r.get("val/voxel_corr_p75")]
    assert len(p75) == 2 and all(-1 <= v <= 1 for v in p75)


def test_shared_test_images_never_reach_encoder_training(tiny_store):
    from brainit_pl.data.datamodule import NSDDataModule

    cfg = yaml.safe_load(Path(CONFIG).read_text())["data"]
    dm = NSDDataModule(**{**cfg, "store": str(tiny_store), "image_sizes": []})
    dm.setup("fit")
    shared = {
        int(i)
        for s in dm.subjects
        for i, is_shared in zip(dm.store.subject(s).trials["nsd_id"], dm.store.subject(s).trials["shared"])
        if is_shared
    }
    seen = {
        int(i) for split in ("train", "val") for batch in dm.make_dataloader(split) for i in batch["nsd_id"]
    }
    assert shared and seen and not shared & seen


def test_brain_maps_of_the_last_epoch_go_to_tensorboard(tiny_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["fit", "--config", CONFIG, "--data.store", str(tiny_store), "--trainer.default_root_dir"]
    assert (
        main([*args, str(tmp_path), "--trainer.max_epochs", "1", "--model.init_args.brain_maps", "true"]) == 0
    )
    maps = sorted(p.name for p in tmp_path.rglob("brain_maps/*.png"))
    assert maps == [f"val_{m}_subj0{s}.png" for m in ("noise_ceiling", "voxel_corr") for s in (1, 2)]
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["images"]
    assert {"val/brain_voxel_corr/subj01", "val/brain_noise_ceiling/subj02"} <= set(tags)
