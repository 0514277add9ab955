"""The unCLIP stage: architecture, MindEye2's sgm checkpoint, the sgm-equivalent Euler sampler, end to end."""

import argparse
import math

import numpy as np
import pytest
import torch

from brainit_pl.backbones.clip import TINY_CONFIG as TINY_CLIP_CONFIG
from brainit_pl.backbones.weights import WEIGHT_FILES, WEIGHTS_ENV
from brainit_pl.errors import BrainITError
from brainit_pl.models.sgm_keys import (
    UNET_PREFIX,
    VAE_PREFIX,
    diffusers_to_sgm,
    save_sgm_checkpoint,
    sgm_to_diffusers,
)
from brainit_pl.models.unclip import (
    TINY_UNET_CONFIG,
    WEIGHTS_KEY,
    UnCLIPSampler,
    build_unclip_unet,
    build_unclip_vae,
    euler_sample,
    load_unclip,
    unclip_scheduler,
    vector_condition,
)

# --- sgm reference, in plain torch (generative-models: LegacyDDPMDiscretization, DiscreteDenoiser with
# EpsScaling, EulerEDMSampler with s_churn = 0, ConcatTimestepEmbedderND) ---------------------------------


def sgm_alphas_cumprod() -> np.ndarray:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # make_beta_schedule
    return np.cumprod(1.0 - betas.numpy())


def sgm_timesteps(n: int) -> np.ndarray:
    """generate_roughly_equally_spaced_steps(n, 1000), ascending."""
    return np.linspace(999, 0, n, endpoint=False).astype(int)[::-1]


def sgm_sigmas(n: int = 50) -> torch.Tensor:
    """LegacyDDPMDiscretization()(n): n sigmas from high to low, then 0."""
    ac = sgm_alphas_cumprod()[sgm_timesteps(n)]
    sigmas = torch.tensor((1 - ac) / ac, dtype=torch.float32) ** 0.5
    return torch.cat([sigmas.flip(0), sigmas.new_zeros(1)])


def sgm_sample(network, z, noise, start_step, n=50, guidance=None):
    """The authors' unclip_recon_new + EulerEDMSampler around ε = network(x_in, t).

    With ``guidance``, sgm's VanillaCFG: the network sees the batch twice (unconditional half first) and the
    two denoised halves are mixed.
    """
    sigmas = sgm_sigmas(n)
    table = sgm_sigmas(1000)[:-1].flip(0)  # DiscreteDenoiser.sigmas: index = train step
    x = (z + noise * sigmas[start_step]) / torch.sqrt(1.0 + sigmas[0] ** 2)  # unclip_recon_new
    x = x * torch.sqrt(1.0 + sigmas[0] ** 2)  # prepare_sampling_loop
    for i in range(start_step, n):
        sigma = sigmas[i]
        idx = (sigma - table).abs().argmin()  # sigma_to_idx; the denoiser quantises sigma to the table
        s = table[idx]
        x_in = x if guidance is None else torch.cat([x, x])
        denoised = x_in + network(x_in / torch.sqrt(s**2 + 1.0), idx.float()) * -s  # c_skip 1, c_out -σ
        if guidance is not None:
            d_u, d_c = denoised.chunk(2)
            denoised = d_u + guidance * (d_c - d_u)
        x = x + (sigmas[i + 1] - sigma) * (x - denoised) / sigma  # to_d + euler_step
    return x


@torch.no_grad()
def sgm_unclip(unet, vae, tokens, init, generator, *, n, start_step, size):
    """The authors' CombinedDiffusionEngine.generate, with the UNet and VAE in diffusers form."""
    b = tokens.shape[0]
    if init is None:
        z, start_step = torch.randn(b, 4, size // 8, size // 8, generator=generator), 0
    else:
        x = torch.nn.functional.interpolate(init, size=(size, size), mode="bilinear")
        z = vae.encode(x * 2 - 1).latent_dist.sample(generator=generator) * 0.13025  # encode_first_stage
    uc = torch.randn(tokens.shape, generator=generator)
    noise = torch.randn(z.shape, generator=generator) + 0.04 * torch.randn(b, 1, 1, 1, generator=generator)
    context, vector = torch.cat([uc, tokens]), vector_condition(unet, 2 * b)

    def network(x_in, t):
        return unet(x_in, t, encoder_hidden_states=context, added_cond_kwargs=vector).sample

    z = sgm_sample(network, z, noise, start_step, n, guidance=5.0)
    images = ((vae.decode(z / 0.13025).sample + 1.0) / 2.0).clamp(0, 1)  # decode_first_stage
    return (images - 0.5) * 0.8 + 0.5


def sgm_vector(original_size, crop, outdim=256):
    """GeneralConditioner's "vector": ConcatTimestepEmbedderND of original_size, then of crop."""

    def embed(values):
        half = outdim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = torch.tensor(values, dtype=torch.float32)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten()  # (d d2)

    return torch.cat([embed(original_size), embed(crop)])


def toy_eps(x, t):
    """A deterministic ε that depends on both the scaled sample and the timestep."""
    return torch.tanh(1.3 * x + torch.sin(x.flip(-1))) * (0.5 + t / 1000.0) + 0.05 * torch.cos(t / 37.0)


# --- architecture -------------------------------------------------------------------------------------


def test_real_unet_and_vae_are_sdxl_sized_with_sdxl_key_layout():
    unet, vae = build_unclip_unet(device="meta"), build_unclip_vae(device="meta")
    assert (
        sum(p.numel() for p in unet.parameters()) == 2_501_272_324
    )  # SDXL's 2.567B minus 2048→1664, 2816→1024
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert (len(unet.state_dict()), len(vae.state_dict())) == (1680, 248)  # as SDXL base's UNet and VAE
    sgm = {k: tuple(v.shape) for k, v in diffusers_to_sgm(unet, vae).items()}
    known = {  # names and shapes of SDXL's original (ldm/sgm) checkpoints
        "model.diffusion_model.label_emb.0.0.weight": (1280, 1024),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 1664),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.2.in_layers.2.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    }
    assert {k: sgm.get(k) for k in known} == known
    # diffusers' own converters map the whole sgm layout back onto every key of the real architecture
    state = {k: torch.empty(s, device="meta") for k, s in sgm.items()}
    unet_state, vae_state = sgm_to_diffusers(state, unet.config, vae.config, source="meta")
    assert set(unet_state) == set(unet.state_dict()) and set(vae_state) == set(vae.state_dict())


def test_tiny_twins_match_tiny_clip_width_and_are_seeded():
    assert TINY_UNET_CONFIG["cross_attention_dim"] == TINY_CLIP_CONFIG["vision_cfg"]["width"]
    a, b, c = (
        build_unclip_unet(True, seed=0),
        build_unclip_unet(True, seed=0),
        build_unclip_unet(True, seed=1),
    )
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert sum(p.numel() for p in a.parameters()) < 1_000_000


def test_vector_condition_equals_sgm_concat_timestep_embedder():
    unet = build_unclip_unet(True)
    seen = {}
    unet.add_embedding.register_forward_pre_hook(lambda module, args: seen.update(vector=args[0]))
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    unet(
        x,
        torch.tensor([500.0, 500.0]),
        encoder_hidden_states=context,
        added_cond_kwargs=vector_condition(unet, 2),
    )
    expected = sgm_vector((256, 256), (0, 0))
    assert seen["vector"].shape == (2, 1024)
    torch.testing.assert_close(seen["vector"], expected.expand(2, -1), rtol=0, atol=1e-6)


# --- the sgm checkpoint -------------------------------------------------------------------------------


def test_tiny_sgm_checkpoint_loads_back_exactly(tmp_path):
    unet, vae = load_unclip(tiny=True, seed=3)
    state = diffusers_to_sgm(unet, vae)
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX)) for k in state)
    # like MindEye2's file: a Lightning-style dict, with the conditioner and the denoiser's buffers beside
    extra = {
        "conditioner.embedders.0.model.visual.proj": torch.randn(4, 4),
        "denoiser.sigmas": torch.rand(1000),
    }
    path = tmp_path / "unclip.ckpt"
    torch.save({"state_dict": {**state, **extra}, "global_step": 110000}, path)

    loaded = load_unclip(path, tiny=True)
    for original, copy in ((unet, loaded.unet), (vae, loaded.vae)):
        expected = original.state_dict()
        assert set(copy.state_dict()) == set(expected)
        assert all(torch.equal(v, expected[k]) for k, v in copy.state_dict().items())
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 19.0]), torch.randn(2, 7, 32)
    cond = vector_condition(unet, 2)
    with torch.no_grad():
        assert torch.equal(
            loaded.unet(x, t, context, added_cond_kwargs=cond).sample,
            unet(x, t, context, added_cond_kwargs=cond).sample,
        )
        images = torch.rand(1, 3, 64, 64)
        assert torch.equal(loaded.vae(images).sample, vae(images).sample)


def test_missing_default_checkpoint_names_file_source_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    spec = WEIGHT_FILES[WEIGHTS_KEY]
    with pytest.raises(BrainITError) as err:
        load_unclip()
    message = str(err.value)
    assert str(tmp_path / "unclip6_epoch0_step110000.ckpt") in message and "\n" not in message
    assert "huggingface.co/datasets/pscotti/mindeyev2" in spec.url and spec.url in message
    with pytest.raises(BrainITError, match="weight file not found: .*nope.ckpt"):
        load_unclip(tmp_path / "nope.ckpt")


def test_file_without_sgm_layout_says_what_it_holds(tmp_path):
    unet = build_unclip_unet(True)
    path = tmp_path / "diffusers_unet.ckpt"
    torch.save({"state_dict": unet.state_dict()}, path)  # a diffusers-layout file, no sgm prefixes
    with pytest.raises(
        BrainITError, match=r"no model\.diffusion_model\.\* keys .* prefixes \['add_embedding"
    ):
        load_unclip(path, tiny=True)


def test_shape_mismatch_names_the_tensor(tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 16})  # e.g. another CLIP
    path = save_sgm_checkpoint(tmp_path / "other.ckpt", other, build_unclip_vae(True))
    with pytest.raises(
        BrainITError, match=r"other shapes.*attn2\.to_k\.weight: expected \(16, 32\), found \(16, 16\)"
    ):
        load_unclip(path, tiny=True)
    no_vector = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "addition_embed_type": None})  # SD-1/2 style
    path = save_sgm_checkpoint(tmp_path / "no_vector.ckpt", no_vector, build_unclip_vae(True))
    with pytest.raises(
        BrainITError, match=r"no_vector.ckpt does not hold .* tensor 'label_emb\.0\.0\.weight'"
    ):
        load_unclip(path, tiny=True)


def test_training_checkpoint_with_python_objects_is_refused_in_one_line(tmp_path):
    unet, vae = load_unclip(tiny=True)
    path = tmp_path / "full.ckpt"
    torch.save(
        {"state_dict": diffusers_to_sgm(unet, vae), "hyper_parameters": argparse.Namespace(lr=1)}, path
    )
    with pytest.raises(BrainITError, match=r"argparse\.Namespace.*weights_only=False") as err:
        load_unclip(path, tiny=True)
    assert "\n" not in str(err.value)


# --- the sampler against sgm --------------------------------------------------------------------------


def test_trailing_spacing_reproduces_sgm_legacy_ddpm_sigmas():
    scheduler = unclip_scheduler()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.long().tolist() == sgm_timesteps(50)[::-1].tolist()  # 999, 979, ..., 19
    torch.testing.assert_close(scheduler.sigmas, sgm_sigmas(50), rtol=1e-5, atol=1e-5)
    assert abs(scheduler.sigmas[14].item() - 3.6010) < 1e-4  # the start sigma of the DIP img2img
    for spacing in ("leading", "linspace"):  # the other spacings do not
        other = type(scheduler).from_config(scheduler.config, timestep_spacing=spacing, steps_offset=1)
        other.set_timesteps(50)
        assert (other.sigmas - sgm_sigmas(50)).abs().max() > 0.1


@pytest.mark.parametrize("start_step", [0, 14, 49])
def test_euler_sample_reproduces_sgm_euler_edm(start_step):
    gen = torch.Generator().manual_seed(start_step)
    z, noise = torch.randn(2, 4, 6, 5, generator=gen), torch.randn(2, 4, 6, 5, generator=gen)
    ours = euler_sample(toy_eps, z, noise, start_step=start_step)
    reference = sgm_sample(toy_eps, z, noise, start_step)  # toy_eps plays the network
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - z).abs().max() > 1e-3  # the toy ε moved the sample


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    return load_unclip(tiny=True)


def test_sampler_from_dip_image_and_from_noise(tiny_models):
    # a 5-step schedule keeps this fast; the 50-step schedule itself is checked against sgm above
    sampler = UnCLIPSampler(*tiny_models, num_steps=5, start_step=2, progress=False)
    gen = torch.Generator().manual_seed(0)
    tokens, dip = torch.randn(2, 256, 32, generator=gen), torch.rand(2, 3, 224, 224, generator=gen)

    def run(init):
        return sampler(tokens, init, generator=torch.Generator().manual_seed(0))

    images = run(dip)
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.float32
    assert images.min() >= 0.1 - 1e-6 and images.max() <= 0.9 + 1e-6  # clamp to [0, 1], contrast 0.8
    assert torch.equal(images, run(dip))  # seeded
    assert not torch.allclose(images, run(dip.flip(-1)))  # same noise, another init image: it matters
    scratch = run(None)
    assert scratch.shape == (2, 3, 256, 256) and not torch.allclose(scratch, images)


@pytest.mark.parametrize("with_init", [True, False])
def test_sampler_equals_sgm_reference_with_the_tiny_unet(tiny_models, with_init):
    # guidance, unconditional noise tokens, offset noise, VAE scale and contrast against the authors' code
    sampler = UnCLIPSampler(*tiny_models, num_steps=8, start_step=3, image_size=64, progress=False)
    gen = torch.Generator().manual_seed(1)
    tokens, init = torch.randn(2, 256, 32, generator=gen), torch.rand(2, 3, 48, 48, generator=gen)
    init = init if with_init else None
    ours = sampler(tokens, init, generator=torch.Generator().manual_seed(2))
    reference = sgm_unclip(
        *tiny_models, tokens, init, torch.Generator().manual_seed(2), n=8, start_step=3, size=64
    )
    assert ours.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sampler_with_the_default_schedule(tiny_models):
    sampler = UnCLIPSampler(*tiny_models)
    assert (sampler.num_steps, sampler.start_step, sampler.guidance_scale) == (50, 14, 5.0)
    gen = torch.Generator().manual_seed(0)
    tokens, dip = torch.randn(2, 256, 32, generator=gen), torch.rand(2, 3, 224, 224, generator=gen)
    for init in (dip, None):
        images = sampler(tokens, init, generator=gen)
        assert images.shape == (2, 3, 256, 256) and images.min() >= 0.1 - 1e-6 and images.max() <= 0.9 + 1e-6


def test_sampler_checks_its_inputs(tiny_models):
    tiny_sampler = UnCLIPSampler(*tiny_models, progress=False)
    with pytest.raises(BrainITError, match=r"expected tokens \(B, T, 32\)"):
        tiny_sampler(torch.randn(1, 256, 1664))
    with pytest.raises(BrainITError, match="init images must be in"):
        tiny_sampler(torch.randn(1, 256, 32), torch.rand(1, 3, 224, 224) * 255)
    with pytest.raises(BrainITError, match=r"expected init images \(2, 3, H, W\)"):
        tiny_sampler(torch.randn(2, 256, 32), torch.rand(1, 3, 224, 224))
