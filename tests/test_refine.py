"""The SDXL refinement: tiny twin saved and loaded (folder and single file), the authors' 8-step schedule, errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.transform import resize

from brainit_pl.backbones.weights import WEIGHT_FILES, WEIGHTS_ENV
from brainit_pl.errors import BrainITError
from brainit_pl.metrics.protocols import resize_bilinear
from brainit_pl.models.sgm_keys import diffusers_to_sgm
from brainit_pl.recon.refine import (
    CONFIG_DIR,
    NEGATIVE_PROMPT,
    NUM_STEPS,
    START_STEP,
    TARGET_SIZE,
    WEIGHTS_KEY,
    build_refiner,
    refine,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

SIZE = 64  # the tiny twin's stand-in for 768²: an 8 × 8 latent
SDXL_BASE_SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# --- the real formats, written from a tiny twin --------------------------------------------------------------


def open_clip_text_state(model, prefix):
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (SDXL files' ``conditioner.embedders.1``)."""
    sd = model.state_dict()
    out = {
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,  # OpenCLIP: x @ proj; transformers: Linear
    }
    for i in range(model.config.num_hidden_layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                qkv
            )  # (3D, D) / (3D,): fused as nn.MultiheadAttention
            for ours, theirs in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{oc}{ours}.{kind}"] = sd[f"{hf}{theirs}.{kind}"]
    return {prefix + k: v for k, v in out.items()}


def save_sdxl_single_file(pipe, path):
    """The pipeline as an SDXL single file: sgm UNet/VAE, HF CLIP-L, OpenCLIP bigG (sd_xl_base_1.0's layout)."""
    state = diffusers_to_sgm(pipe.unet, pipe.vae)
    for key, value in pipe.text_encoder.state_dict().items():
        state["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    state.update(open_clip_text_state(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def twin():
    return build_refiner(tiny=True, seed=0)


@pytest.fixture(scope="module")
def twin_folder(twin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    twin.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(twin_folder):
    """The tiny twin as read back from its diffusers folder: what the tests below run."""
    return build_refiner(twin_folder)


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def images(b=2, h=40, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def run(pipe, x, seed=0, **kwargs):
    return refine(pipe, x, size=SIZE, generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


def count_unet_calls(pipe):
    """Record (batch, timestep) of every UNet forward; returns the list and the hook handle."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].shape[0], int(args[1])))

    return calls, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


# --- loading -------------------------------------------------------------------------------------------------


def test_twin_is_seeded_and_sdxl_shaped(twin):
    again = build_refiner(tiny=True, seed=0)
    assert_same_weights(twin, again)
    other = build_refiner(tiny=True, seed=1)
    assert not torch.equal(twin.unet.conv_in.weight, other.unet.conv_in.weight)
    te, te2, unet = twin.text_encoder.config, twin.text_encoder_2.config, twin.unet.config
    assert te.hidden_size != te2.hidden_size  # as CLIP-L (768) and bigG (1280)
    assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert twin.tokenizer.pad_token == "<|endoftext|>" and twin.tokenizer_2.pad_token == "!"
    assert twin.watermark is None
    # the scheduler is sgm's: trailing spacing, so 25 steps start at train step 999 and end at 39
    twin.scheduler.set_timesteps(NUM_STEPS)
    assert twin.scheduler.timesteps[[0, START_STEP, -1]].tolist() == [999, 319, 39]


def test_folder_loads_back_exactly(twin, pipe):
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert_same_weights(twin, pipe)
    assert pipe.tokenizer_2.pad_token == "!"


def test_sdxl_base_scheduler_is_replaced_by_the_authors(twin_folder, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(twin_folder, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_BASE_SCHEDULER))
    loaded = build_refiner(folder)
    loaded.scheduler.set_timesteps(NUM_STEPS)
    assert loaded.scheduler.timesteps[[0, START_STEP, -1]].tolist() == [999, 319, 39]  # not 961, 281, 1
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SDXL_BASE_SCHEDULER, "prediction_type": "v_prediction"})
    )
    with pytest.raises(BrainITError, match="predicts v_prediction"):
        build_refiner(folder)


def test_single_file_with_config_folder_loads_back_exactly(twin, twin_folder, tmp_path):
    path = save_sdxl_single_file(twin, tmp_path / "tiny_sdxl.safetensors")
    loaded = build_refiner(path, config=twin_folder)
    assert_same_weights(twin, loaded)
    # the default config folder is WEIGHTS/stable-diffusion-xl-base-1.0
    shutil.copytree(twin_folder, tmp_path / CONFIG_DIR)
    assert_same_weights(twin, build_refiner(path, weights_dir=tmp_path))


# --- refining ------------------------------------------------------------------------------------------------


def test_refine_shape_range_and_determinism(pipe):
    x = images(b=3)
    out = run(pipe, x, seed=0)
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(run(pipe, x, seed=0), out, rtol=0, atol=0)
    assert (run(pipe, x, seed=1) - out).abs().max() > 1e-3
    assert run(pipe, x, out_size=32).shape == (3, 3, 32, 32)


def test_exactly_the_last_eight_steps_run_in_one_guided_batch(pipe):
    calls, handle = count_unet_calls(pipe)
    try:
        run(pipe, images(b=3))
        assert calls == [(6, t) for t in range(319, 0, -40)]  # 8 calls of 2B, train steps 319 … 39
        calls.clear()
        run(pipe, images(b=3), start_step=0)
        assert [t for _, t in calls] == list(range(999, 0, -40))  # all 25
        calls.clear()
        run(pipe, images(b=3), guidance_scale=1.0)
        assert calls == [(3, t) for t in range(319, 0, -40)]  # no unconditional half
    finally:
        handle.remove()


def test_every_split_of_the_schedule_runs_the_steps_asked(pipe):
    calls, handle = count_unet_calls(pipe)
    try:
        # k = n − start_step steps where int(n · (k/n)) ≠ k in floats, and the 1-step and all-steps ends
        for num_steps, start_step in ((22, 7), (23, 10), (26, 11), (10, 9), (4, 0)):
            calls.clear()
            run(pipe, images(b=1), num_steps=num_steps, start_step=start_step)
            assert len(calls) == num_steps - start_step, (num_steps, start_step)
    finally:
        handle.remove()


def test_refine_equals_the_authors_sgm_loop(pipe):
    """enhance_recons in plain torch: z + σ·n at sigmas[-9], then 8 Euler steps on the guided ε."""
    x = images(b=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        img = resize_bilinear(x, SIZE)
        z = pipe.vae.encode(img * 2 - 1).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=gen)
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        ac = np.cumprod(1.0 - betas)
        steps = np.linspace(999, 0, NUM_STEPS, endpoint=False).astype(int)  # 999, 959, …, 39
        sigmas = [*((1 - ac[steps]) / ac[steps]) ** 0.5, 0.0]  # 26: high → low, then 0
        kept, ts = sigmas[-9:], steps[-8:]  # the authors' img2img_timepoint = 9
        prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
            "", num_images_per_prompt=2, negative_prompt=NEGATIVE_PROMPT
        )
        context = torch.cat([negative, prompt])  # (2B, 77, D): unconditional first
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, TARGET_SIZE, TARGET_SIZE]] * 4, dtype=torch.float32)
        added = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids}
        lat = z + noise * kept[0]
        for i, t in enumerate(ts):
            s = kept[i]
            x_in = torch.cat([lat, lat]) / (s**2 + 1) ** 0.5
            eps = pipe.unet(x_in, int(t), encoder_hidden_states=context, added_cond_kwargs=added).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + 5.0 * (eps_c - eps_u)
            lat = lat + (kept[i + 1] - s) * eps  # Euler: x + (σ' − σ)·(x − D)/σ with D = x − σε
        ref = ((pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
        ref = [
            resize(r.permute(1, 2, 0).numpy(), (224, 224), anti_aliasing=True) for r in ref
        ]  # as they save
        ref = torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).float()
    out = run(pipe, x, seed=3)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)


# --- errors --------------------------------------------------------------------------------------------------


def test_missing_default_checkpoint_names_file_source_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    spec = WEIGHT_FILES[WEIGHTS_KEY]
    with pytest.raises(BrainITError) as err:
        build_refiner()
    message = str(err.value)
    assert str(tmp_path / spec.path) in message and spec.url in message and spec.size in message
    assert "model_index.json" in message and CONFIG_DIR in message and "\n" not in message


def test_missing_explicit_path_is_named(tmp_path):
    with pytest.raises(BrainITError, match=f"weight file not found: {tmp_path / 'nope'}.*model_index.json"):
        build_refiner(tmp_path / "nope")


def test_single_file_without_its_config_folder(twin, tmp_path):
    path = save_sdxl_single_file(twin, tmp_path / "sdxl.safetensors")
    with pytest.raises(BrainITError, match=f"missing config folder of {path} {tmp_path / CONFIG_DIR}"):
        build_refiner(path, weights_dir=tmp_path)


def test_folders_that_are_not_sdxl_pipelines(twin_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrainITError, match="has no model_index.json"):
        build_refiner(tmp_path / "empty")
    no_te2 = tmp_path / "refiner"  # the SDXL *refiner* model's layout: no first text encoder
    shutil.copytree(twin_folder, no_te2)
    index = json.loads((no_te2 / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (no_te2 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BrainITError, match="without text_encoder, not an SDXL base pipeline"):
        build_refiner(no_te2)
    no_dir = tmp_path / "no_te2_dir"
    shutil.copytree(twin_folder, no_dir)
    shutil.rmtree(no_dir / "text_encoder_2")
    with pytest.raises(BrainITError, match=r"lacks the subfolders \['text_encoder_2'\]"):
        build_refiner(no_dir)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(twin_folder, no_weights)
    for f in (no_weights / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(BrainITError, match=f"cannot load an SDXL pipeline from {no_weights}") as err:
        build_refiner(no_weights)
    assert "\n" not in str(err.value)


def test_single_files_that_do_not_fit(twin, twin_folder, tmp_path):
    unet_only = tmp_path / "unclip.safetensors"  # e.g. an sgm file with no text encoders
    save_file({k: v.contiguous() for k, v in diffusers_to_sgm(twin.unet, twin.vae).items()}, str(unet_only))
    with pytest.raises(
        BrainITError, match=r"not an SDXL single-file checkpoint: no \['conditioner.embedders.0"
    ):
        build_refiner(unet_only, config=twin_folder)
    path = save_sdxl_single_file(twin, tmp_path / "sdxl.safetensors")
    config = tmp_path / "config"
    shutil.copytree(twin_folder, config)
    unet_config = json.loads((config / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [16, 32, 64]  # configs that do not fit the file's tensors
    (config / "unet" / "config.json").write_text(json.dumps(unet_config))
    with pytest.raises(BrainITError, match=f"cannot load an SDXL pipeline from {path}") as err:
        build_refiner(path, config=config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("x", "match", "kwargs"),
    [
        (torch.rand(3, 40, 40), r"expected images \(B, 3, H, W\)", {}),
        (torch.rand(2, 1, 40, 40), r"expected images \(B, 3, H, W\)", {}),
        (torch.rand(2, 3, 40, 40) * 2 - 1, r"must be in \[0, 1\]", {}),
        (torch.randint(0, 255, (2, 3, 40, 40), dtype=torch.uint8), "expected float images", {}),
        (torch.rand(2, 3, 40, 40), r"start_step must be in \[0, 25\)", {"start_step": 25}),
        (torch.rand(2, 3, 40, 40), "size must be a positive multiple of 8", {"size": 60}),
    ],
)
def test_refine_checks_its_inputs(pipe, x, match, kwargs):
    with pytest.raises(BrainITError, match=match):
        refine(pipe, x, progress=False, **{"size": SIZE, **kwargs})
