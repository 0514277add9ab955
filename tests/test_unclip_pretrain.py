"""unCLIP pretraining of the tiny twin (lit/unclip_pretrain.py): CLI fit, sgm export, loss going down."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.lit.unclip_pretrain import UnCLIPPretrainModule, rescale_latent_space
from brainit_pl.models.sgm_keys import diffusers_to_sgm
from brainit_pl.models.unclip import UnCLIPSampler, build_unclip_unet, build_unclip_vae, load_unclip

CONFIG = Path(__file__).parents[1] / "configs" / "sim" / "unclip_pretrain_demo.yaml"
SHORT = (
    *(
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
    ),
    *("--data.batch_size", "4", "--data.num_workers", "0", "--model.init_args.warmup_steps", "1"),
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny ops: one thread is fastest on the shared 2-core machine (as tests/test_stage2.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scalars(root) -> dict[str, list[float]]:
    (events,) = Path(root).rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _fit(store, root, *extra) -> int:
    return main(
        [
            "fit",
            *("--config", str(CONFIG), "--data.store", str(store)),
            *("--trainer.default_root_dir", str(root), *SHORT, *extra),
        ]
    )


@pytest.fixture(scope="module")
def two_phases(bit_store, tmp_path_factory):
    """1 VAE epoch + 1 UNet epoch (2 batches each) through the CLI; returns (run folder, exported file)."""
    root = tmp_path_factory.mktemp("unclip_pretrain")
    export = root / "unclip_tiny.ckpt"
    args = ("--trainer.max_epochs", "2", "--model.init_args.vae_epochs", "1")
    assert _fit(bit_store, root, *args, "--model.init_args.export", str(export)) == 0
    return root, export


def test_fit_trains_the_vae_then_the_unet_and_exports_an_sgm_checkpoint(two_phases):
    root, export = two_phases
    logged = _scalars(root)
    assert len(logged["train/vae_loss"]) == 2 and len(logged["train/unet_loss"]) == 2
    assert len(logged["val/vae_loss"]) == 1 and len(logged["val/unet_loss"]) == 1
    assert all(0 < x < 10 for x in logged["train/vae_loss"] + logged["train/unet_loss"])
    # The export is the trained pair in the sgm layout, the same tensors as the Lightning checkpoint's.
    (last,) = Path(root).rglob("last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert state["latent_rescaled"]
    models = load_unclip(export, tiny=True)
    for part in ("unet", "vae"):
        for key, value in getattr(models, part).state_dict().items():
            assert torch.equal(value, state[f"{part}.{key}"]), key
    random = load_unclip(None, tiny=True)
    assert not torch.equal(models.unet.conv_in.weight, random.unet.conv_in.weight)  # it did train
    assert not torch.equal(models.vae.encoder.conv_in.weight, random.vae.encoder.conv_in.weight)


def test_the_export_samples_at_the_pretraining_size(two_phases, bit_store):
    models = load_unclip(two_phases[1], tiny=True)
    tokens = _data(bit_store, 2)["clip_tokens"]
    sampler = UnCLIPSampler(models.unet, models.vae, image_size=64, num_steps=4, start_step=1, progress=False)
    images = sampler(tokens, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    init = sampler(tokens, init_images=torch.rand(2, 3, 224, 224), generator=torch.Generator())
    assert init.shape == (2, 3, 64, 64)


def test_unet_only_from_an_init_checkpoint(two_phases, bit_store, tmp_path):
    # vae_epochs 0: the VAE of `init` is kept (already rescaled), only the UNet trains.
    export = tmp_path / "again.ckpt"
    extra = ("--trainer.max_epochs", "1", "--model.init_args.vae_epochs", "0")
    extra += ("--model.init_args.init", str(two_phases[1]), "--model.init_args.export", str(export))
    assert _fit(bit_store, tmp_path / "run", *extra) == 0
    before, after = load_unclip(two_phases[1], tiny=True), load_unclip(export, tiny=True)
    for key, value in before.vae.state_dict().items():
        assert torch.equal(after.vae.state_dict()[key], value), key
    assert not torch.equal(before.unet.conv_in.weight, after.unet.conv_in.weight)


def test_rescaling_the_latent_space_keeps_the_autoencoder():
    vae = build_unclip_vae(True, seed=5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        decoded = vae.decode(before.mean).sample
        rescale_latent_space(vae, 3.0)
        after = vae.encode(x).latent_dist
        torch.testing.assert_close(after.mean, 3.0 * before.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after.std, 3.0 * before.std, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vae.decode(after.mean).sample, decoded, rtol=1e-4, atol=1e-5)
    assert diffusers_to_sgm(build_unclip_unet(True), vae)  # still the sgm layout


def _data(store_dir, n=8) -> dict[str, torch.Tensor]:
    """The first n images of a store: ``image_112`` in [0, 1], ``clip_tokens``, ``nsd_id``."""
    from brainit_pl.data.cache import FeatureCache, cache_path
    from brainit_pl.data.store import Store

    store = Store(store_dir)
    ids = store.images.nsd_ids[:n]
    cache = FeatureCache(cache_path(store.root, "clip"), store.images)
    return {
        "image_112": torch.as_tensor(store.images.images(ids, 112)).float() / 255,
        "clip_tokens": torch.as_tensor(cache.tokens(ids)).float(),
        "nsd_id": torch.as_tensor(ids),
    }


def test_pretraining_lowers_both_losses(bit_store):
    # 25 AdamW steps on 8 images, each part in turn; scored with one fixed draw: both losses go down.
    batch = _data(bit_store)
    module = UnCLIPPretrainModule(image_size=32, vae_epochs=1)
    losses = {
        "vae": lambda gen: module.vae_loss(batch, gen)[0],
        "unet": lambda gen: module.diffusion_loss(batch, gen),
    }
    for part, loss_of in losses.items():
        net = getattr(module, part).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        with torch.no_grad():
            first = float(loss_of(torch.Generator().manual_seed(99)))
        for step in range(25):
            optimizer.zero_grad()
            loss_of(torch.Generator().manual_seed(step)).backward()
            optimizer.step()
        with torch.no_grad():
            last = float(loss_of(torch.Generator().manual_seed(99)))
        assert last < 0.9 * first, (part, first, last)
        net.requires_grad_(False)


def test_export_refuses_a_vae_whose_latents_are_not_rescaled(tmp_path):
    module = UnCLIPPretrainModule(vae_epochs=1)
    with pytest.raises(BrainITError, match="not rescaled"):
        module.export(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_cli_refuses_a_store_without_clip_tokens_in_one_line(bit_store, tmp_path, stderr_lines):
    assert _fit(bit_store, tmp_path, "--data.features", "[]") == 2
    assert "data.features: [clip]" in stderr_lines()[-1]
    assert _fit(bit_store, tmp_path, "--trainer.max_epochs", "2") == 2  # export, but only VAE epochs
    assert "ends within the VAE phase" in stderr_lines()[-1]


def test_stage2_fine_tunes_the_export_at_its_image_size(two_phases, bit_store, tmp_path):
    # Stage 2 reads the pretrained twin unchanged (unclip: PATH, tiny_unclip) and trains at the same 64².
    from brainit_pl.lit.stage2 import Stage2Module

    sim = CONFIG.parent
    stage1 = tmp_path / "stage1"
    args = ["fit", "--config", str(sim / "bit_tiny.yaml"), "--data.store", str(bit_store)]
    args += ["--model.init_args.clusters", str(bit_store / "clusters.npz"), "--trainer.max_epochs", "1"]
    args += ["--trainer.default_root_dir", str(stage1), "--trainer.limit_train_batches", "2"]
    args += ["--trainer.limit_val_batches", "1", "--data.batch_size", "4"]
    assert main(args) == 0
    (bit_ckpt,) = stage1.rglob("last.ckpt")
    root = tmp_path / "stage2"
    args = ["fit", "--config", str(sim / "stage2_tiny.yaml"), "--data.store", str(bit_store)]
    args += [
        "--model.init_args.bit_checkpoint",
        str(bit_ckpt),
        "--model.init_args.unclip",
        str(two_phases[1]),
    ]
    args += ["--model.init_args.image_size", "64", "--trainer.max_epochs", "1"]
    args += ["--trainer.default_root_dir", str(root), "--trainer.limit_train_batches", "2"]
    args += ["--trainer.limit_val_batches", "1", "--data.batch_size", "4"]
    assert main(args) == 0
    (last,) = root.rglob("last.ckpt")
    module = Stage2Module.load_from_checkpoint(last, map_location="cpu")
    pretrained = load_unclip(two_phases[1], tiny=True)
    for key, value in pretrained.vae.state_dict().items():  # the VAE is the pretrained one, frozen
        assert torch.equal(module.vae.state_dict()[key], value), key
    sampler = module.sampler(num_steps=3, start_step=1, progress=False)
    assert sampler.image_size == 64
    tokens = _data(bit_store, 1)["clip_tokens"]
    assert sampler(tokens, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 64, 64)
    # The ablation's stock UNet is the pretrained twin as exported, sampled at the stage-2 model's size.
    from brainit_pl.recon.chain import Reconstructor

    chain = Reconstructor.from_checkpoints(
        None, last, semantic_stock=bit_ckpt, unclip=two_phases[1], tiny_unclip=True
    )
    stock = chain.samplers["semantic_stock"]
    assert stock.image_size == 64
    for key, value in pretrained.unet.state_dict().items():
        assert torch.equal(stock.unet.state_dict()[key], value), key
