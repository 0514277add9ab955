"""The unCLIP stage against vectors recorded from the authors' sgm code (``tests/data/unclip_sampler_reference.npz``).

A tiny SDXL-unCLIP (``tests/data/unclip_tiny_config.yaml``: the authors' unclip6.yaml at small widths) with
random weights stored under the real checkpoint's sgm names is loaded through our sgm → diffusers
conversion; then one UNet call, the VAE posterior and decoder, and the whole img2img trajectory of
``CombinedDiffusionEngine.generate`` (36 Euler steps from step 14, guidance 5) are compared given the
recorded random draws.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from brainit_pl.models.sgm_keys import sgm_to_diffusers
from brainit_pl.models.unclip import UnCLIPSampler, legacy_ddpm_sigmas, vector_condition, vector_embedding

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "unclip_sampler_reference.npz") as z:
        return {k: z[k] for k in z.files}


def t(array):
    return torch.from_numpy(np.array(array))


def diffusers_configs(params):
    """The diffusers configs of sgm's UNetModel and AutoencoderKL params (the subset the tiny config uses)."""
    unet_p = params["network_config"]["params"]
    dd = params["first_stage_config"]["params"]["ddconfig"]
    widths = [unet_p["model_channels"] * m for m in unet_p["channel_mult"]]
    attention = [2**i in unet_p["attention_resolutions"] for i in range(len(widths))]
    unet = {
        "sample_size": dd["resolution"] // 2 ** (len(dd["ch_mult"]) - 1),
        "in_channels": unet_p["in_channels"],
        "out_channels": unet_p["out_channels"],
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]),
        "block_out_channels": tuple(widths),
        "layers_per_block": unet_p["num_res_blocks"],
        "transformer_layers_per_block": tuple(unet_p["transformer_depth"]),
        "attention_head_dim": tuple(w // unet_p["num_head_channels"] for w in widths),  # diffusers: heads
        "use_linear_projection": unet_p["use_linear_in_transformer"],
        "cross_attention_dim": unet_p["context_dim"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": unet_p["adm_in_channels"],
    }
    vae = {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ("DownEncoderBlock2D",) * len(dd["ch_mult"]),
        "up_block_types": ("UpDecoderBlock2D",) * len(dd["ch_mult"]),
        "block_out_channels": tuple(dd["ch"] * m for m in dd["ch_mult"]),
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "sample_size": dd["resolution"],
        "scaling_factor": params["scale_factor"],
    }
    return unet, vae


@pytest.fixture(scope="module")
def models(ref):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    params = yaml.safe_load((DATA / "unclip_tiny_config.yaml").read_text())["model"]["params"]
    unet_config, vae_config = diffusers_configs(params)
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**unet_config).eval(), AutoencoderKL(**vae_config).eval()
    prefix = "unclip/weights/"
    state = {k[len(prefix) :]: t(v).float() for k, v in ref.items() if k.startswith(prefix)}
    unet_state, vae_state = sgm_to_diffusers(state, unet.config, vae.config, source="reference")
    unet.load_state_dict(unet_state, strict=True)
    vae.load_state_dict(vae_state, strict=True)
    return unet.requires_grad_(False), vae.requires_grad_(False)


def test_sigmas_are_sgm_legacy_ddpm(ref):
    sigmas = legacy_ddpm_sigmas(50)
    torch.testing.assert_close(sigmas, t(ref["unclip/sigmas"]), rtol=0, atol=0)
    table = t(ref["unclip/denoiser_sigmas"])
    torch.testing.assert_close(legacy_ddpm_sigmas(1000)[:-1].flip(0), table, rtol=0, atol=0)


def test_vector_condition(ref, models):
    unet, _ = models
    expected = t(ref["unclip/unet_y"])
    torch.testing.assert_close(vector_embedding(unet, vector_condition(unet, 2)), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(expected[:1], t(ref["unclip/vector"]), rtol=0, atol=0)


@torch.no_grad()
def test_one_unet_call(ref, models):
    unet, _ = models
    k = 3
    x, steps = t(ref["unclip/unet_x"][k]), t(ref["unclip/unet_timesteps"][k])
    assert (steps == steps[0]).all()
    out = unet(
        x,
        steps[0].float(),
        encoder_hidden_states=t(ref["unclip/unet_context"]),
        added_cond_kwargs=vector_condition(unet, 2),
    ).sample
    torch.testing.assert_close(out, t(ref["unclip/unet_out"][k]), rtol=0, atol=1e-5)


@torch.no_grad()
def test_vae_posterior_and_decoder(ref, models):
    _, vae = models
    h = vae.quant_conv(vae.encoder(t(ref["unclip/encoder_input"])))
    torch.testing.assert_close(h, t(ref["unclip/posterior_moments"]), rtol=0, atol=1e-4)
    decoded = vae.decode(t(ref["unclip/latents"][-1]) / 0.13025).sample
    torch.testing.assert_close(decoded, t(ref["unclip/decoded"]), rtol=0, atol=1e-5)


@torch.no_grad()
def test_img2img_trajectory_given_the_recorded_draws(ref, models):
    settings = json.loads(str(ref["unclip/settings"]))
    sampler = UnCLIPSampler(
        *models,
        num_steps=settings["num_steps"],
        start_step=settings["start_step"],
        guidance_scale=settings["cfg_scale"],
        offset_noise=settings["offset_noise_level"],
        progress=False,
    )
    draws = {
        "posterior": t(ref["unclip/draw0"]),
        "uncond": t(ref["unclip/draw2"]),
        "noise": t(ref["unclip/draw3"]),
        "offset": t(ref["unclip/draw4"]),
    }
    trajectory = []
    init = t(ref["unclip/img_init"]).permute(2, 0, 1)[None]
    z = sampler.encode(init, draws=lambda site, shape: draws[site])
    torch.testing.assert_close(z, t(ref["unclip/z_init"]), rtol=0, atol=1e-4)
    samples = sampler(
        t(ref["unclip/clip_tokens"]),
        init,
        draws=lambda site, shape: draws[site].reshape(shape),
        callback=lambda step, x: trajectory.append(x.clone()),
    )
    latents = t(ref["unclip/latents"])
    assert len(trajectory) == len(latents)
    for k, x in enumerate(trajectory):
        torch.testing.assert_close(x, latents[k], rtol=0, atol=1e-4, msg=f"latents[{k}]")
    torch.testing.assert_close(samples, t(ref["unclip/samples"]), rtol=0, atol=1e-4)
