"""Stage 2 ("adapted CLIP"): the semantic BIT and the tiny unCLIP twin fine-tuned through the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.lit.stage2 import Stage2Module, ddpm_scheduler, diffusion_noise
from brainit_pl.models.unclip import build_unclip_unet
from test_fit import DIST_VARS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

CONFIGS = Path(__file__).parents[1] / "configs" / "sim"
N_VOXELS = {1: 367, 2: 356}  # the tiny store's subjects
SHORT = ("--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--data.batch_size", "4")


def _scalars(root) -> dict[str, list[float]]:
    (events,) = Path(root).rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _ckpt(root, name="last.ckpt"):
    (path,) = Path(root).rglob(name)
    return torch.load(path, map_location="cpu", weights_only=False)


def _stage2(store, bit_ckpt, root, *extra):
    args = [
        "fit",
        *("--config", str(CONFIGS / "stage2_tiny.yaml"), "--data.store", str(store)),
        *("--model.init_args.bit_checkpoint", str(bit_ckpt), "--trainer.default_root_dir", str(root)),
        *SHORT,
        *extra,
    ]
    return main(args)


@pytest.fixture(scope="module")
def bit_ckpt(bit_store, tmp_path_factory):
    """A stage-1 semantic BIT checkpoint: configs/sim/bit_tiny.yaml, 1 epoch, through the CLI."""
    root = tmp_path_factory.mktemp("stage1")
    args = [
        "fit",
        *("--config", str(CONFIGS / "bit_tiny.yaml"), "--data.store", str(bit_store)),
        *("--model.init_args.clusters", str(bit_store / "clusters.npz")),
        *("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1", *SHORT),
    ]
    assert main(args) == 0
    (path,) = root.rglob("last.ckpt")
    return path


@pytest.fixture(scope="module")
def one_epoch(bit_store, bit_ckpt, tmp_path_factory):
    """Stage 2 for 1 epoch (2 batches) through the CLI; returns the run folder."""
    root = tmp_path_factory.mktemp("stage2")
    assert _stage2(bit_store, bit_ckpt, root, "--trainer.max_epochs", "1") == 0
    return root


@pytest.fixture(scope="module")
def module(bit_ckpt):
    return Stage2Module(N_VOXELS, bit_checkpoint=str(bit_ckpt), tiny_unclip=True)


def _batch(b=3, v=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "betas": torch.randn(b, v, generator=gen),
        "voxel_ids": torch.randint(0, sum(N_VOXELS.values()), (b, v), generator=gen),
        "image_224": torch.rand(b, 3, 224, 224, generator=gen),
    }


def test_fit_logs_finite_loss_and_saves_bit_and_unet_but_not_vae(one_epoch):
    logged = _scalars(one_epoch)
    assert len(logged["train/loss"]) == 2 and len(logged["val/loss"]) == 1
    assert all(0 < x < 10 for x in logged["train/loss"] + logged["val/loss"])  # finite, ε-MSE scale
    state = _ckpt(one_epoch)["state_dict"]
    assert any(k.startswith("unet.") for k in state) and "net.voxel_embed" in state
    assert {k.split(".")[0] for k in state} == {"net", "unet"}  # no VAE, nothing else
    assert _ckpt(one_epoch)["lr_schedulers"][0]["last_epoch"] == 2  # the warm-up stepped per optimizer step


def test_load_from_checkpoint_for_reconstruction(one_epoch):
    # What the reconstruction code does: the fine-tuned UNet and BIT come back, the VAE is rebuilt.
    path = next(Path(one_epoch).rglob("last.ckpt"))
    loaded = Stage2Module.load_from_checkpoint(path, map_location="cpu")
    state = _ckpt(one_epoch)["state_dict"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert loaded.sampler().unet is loaded.unet


def test_resume_continues_exactly(bit_store, bit_ckpt, one_epoch, tmp_path):
    # 2 epochs straight vs the 1-epoch run resumed to 2: same weights, bit for bit.
    assert _stage2(bit_store, bit_ckpt, tmp_path / "straight") == 0
    half = next(Path(one_epoch).rglob("last.ckpt"))
    assert _stage2(bit_store, bit_ckpt, tmp_path / "resumed", "--ckpt_path", str(half)) == 0
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_voxel_embed_only_changes_the_voxel_table_in_16_mixed(bit_store, bit_ckpt, tmp_path):
    # The transfer variant (docs/method.md §7), in the real config's precision (the VAE runs outside autocast).
    extra = ("--model.init_args.trainable", "voxel_embed", "--trainer.max_epochs", "1")
    extra += ("--trainer.precision", "16-mixed")
    assert _stage2(bit_store, bit_ckpt, tmp_path, *extra) == 0
    ckpt = _ckpt(tmp_path)
    after = ckpt["state_dict"]
    start = {
        k: v for k, v in torch.load(bit_ckpt, map_location="cpu", weights_only=False)["state_dict"].items()
    }
    start.update({f"unet.{k}": v for k, v in build_unclip_unet(tiny=True, seed=0).state_dict().items()})
    assert set(after) == set(start)
    for key, value in start.items():
        if key != "net.voxel_embed":
            assert torch.equal(after[key], value), key
    # Gradients reached the table through the frozen UNet: Adam moves a row with a gradient by ≈ lr (5e-5
    # at the warm-up's second step); weight decay alone would move it by lr · 0.01 · |e| < 1e-7.
    assert (after["net.voxel_embed"] - start["net.voxel_embed"]).abs().max() > 1e-5
    assert all(torch.isfinite(v).all() for v in after.values())
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert len(group["params"]) == 1  # the optimizer holds the voxel table only


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["all", "voxel_embed"])
def test_ddp_without_find_unused_parameters(bit_store, bit_ckpt, tmp_path, trainable):
    # Plain DDP (find_unused_parameters off) fails at the second step if a parameter that requires grad
    # got none; frozen parameters (requires_grad False) are not registered at all.
    args = [
        "fit",
        *("--config", str(CONFIGS / "stage2_tiny.yaml"), "--data.store", str(bit_store)),
        *("--model.init_args.bit_checkpoint", str(bit_ckpt), "--trainer.default_root_dir", str(tmp_path)),
        *(*SHORT, "--trainer.max_epochs", "1", "--model.init_args.trainable", trainable),
        *("--trainer.strategy", "ddp", "--trainer.devices", "2"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "brainit_pl.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ckpt(tmp_path)["global_step"] == 2


def test_every_trainable_parameter_gets_a_gradient(module):
    # DDP without find_unused_parameters needs every parameter that requires grad to receive one.
    module.zero_grad()
    module.diffusion_loss(_batch(), torch.Generator().manual_seed(0)).backward()
    params = dict(module.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    assert [n for n, p in params.items() if p.grad is None] == []
    assert not any("vae" in n for n in module.state_dict())  # the frozen VAE is out of module state
    module.zero_grad()


def test_loss_is_deterministic_under_a_generator(module):
    batch = _batch()
    with torch.no_grad():
        a = module.diffusion_loss(batch, torch.Generator().manual_seed(3))
        b = module.diffusion_loss(batch, torch.Generator().manual_seed(3))
        c = module.diffusion_loss(batch, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_semantic_tokens_and_sampling_parts(module, bit_ckpt):
    from brainit_pl.lit.bit import BITModule

    batch = _batch()
    stage1 = BITModule.load_from_checkpoint(bit_ckpt, map_location="cpu")
    with torch.no_grad():
        tokens = module.semantic_tokens(batch["betas"], batch["voxel_ids"])
        torch.testing.assert_close(tokens, stage1(batch["betas"], batch["voxel_ids"]))
    assert tokens.shape == (3, 256, module.unet.config.cross_attention_dim)
    assert module.encode(batch["image_224"]).shape == (3, 4, 32, 32)  # 224² → 256² → 32² latents
    sampler = module.sampler(num_steps=2, start_step=0, progress=False)
    assert sampler.unet is module.unet and sampler.vae is module.vae


def test_noise_matches_sgm():
    # sgm: x_in = (z + σ n) / √(σ² + 1), σ = √((1 − ᾱ) / ᾱ); diffusers: √ᾱ z + √(1 − ᾱ) n.
    scheduler = ddpm_scheduler()
    z, n = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    sigma = ((1 - ac) / ac).sqrt()
    expected = ((z + sigma * n) / (sigma**2 + 1).sqrt()).float()
    torch.testing.assert_close(scheduler.add_noise(z, n, t), expected, rtol=1e-5, atol=1e-5)
    # Offset noise: one shift per image and channel, constant over the latent's pixels.
    gen = torch.Generator().manual_seed(0)
    noise = diffusion_noise((64, 4, 32, 32), 1.0, gen, torch.device("cpu"))
    shifts = noise.mean(dim=(2, 3))  # (B, C): std ≈ √(1 + 1/1024) with the offset, ≈ 0.03 without
    assert 0.8 < shifts.std() < 1.2


def test_refusals(bit_ckpt, tmp_path):
    with pytest.raises(BrainITError, match="voxel counts"):
        Stage2Module({1: 367, 2: 355}, bit_checkpoint=str(bit_ckpt), tiny_unclip=True)
    with pytest.raises(BrainITError, match="bit_checkpoint"):
        Stage2Module(N_VOXELS, tiny_unclip=True)
    # A BIT with 16-wide tokens against the tiny UNet's 32-wide cross-attention.
    from brainit_pl.lit.bit import BITModule

    ckpt = torch.load(bit_ckpt, map_location="cpu", weights_only=False)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}  # CLI bookkeeping
    hp["target_shape"] = (256, 16)
    ckpt["hyper_parameters"], ckpt["state_dict"] = hp, BITModule(**hp).state_dict()
    torch.save(ckpt, tmp_path / "narrow.ckpt")
    with pytest.raises(
        BrainITError, match="16-wide tokens but the tiny unCLIP UNet's cross-attention reads 32"
    ):
        Stage2Module(N_VOXELS, bit_checkpoint=str(tmp_path / "narrow.ckpt"), tiny_unclip=True)


def test_cli_refusal_is_one_line(bit_store, tmp_path, stderr_lines):
    assert _stage2(bit_store, tmp_path / "missing.ckpt", tmp_path) == 2
    lines = stderr_lines()
    assert "missing.ckpt does not exist" in lines[-1] and sum("error" in line for line in lines) == 1, lines


def test_validation_previews_of_the_adapted_model(bit_store, bit_ckpt, tmp_path):
    """The ReconstructionCallback of configs/sim/stage2_demo.yaml: stage ``semantic`` from noise, in TensorBoard."""
    preview = ("--trainer.callbacks+=brainit_pl.recon.callback.ReconstructionCallback",)
    preview += ("--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.n_images=2")
    assert _stage2(bit_store, bit_ckpt, tmp_path, "--trainer.max_epochs", "1", *preview) == 0
    assert -1 <= _scalars(tmp_path)["val/recon_semantic_pixcorr"][0] <= 1
    (events,) = Path(tmp_path).rglob("events.out.tfevents.*")
    assert "val/reconstructions" in EventAccumulator(str(events)).Reload().Tags()["images"]
