"""The optional SDXL refinement: img2img over the unCLIP images (docs/method.md §6.3).

A diffusers ``StableDiffusionXLImg2ImgPipeline`` run as the authors' ``enhance_recons`` (brainit-fmri
``utils/diffusion_utils.py``, adapted from MindEye2's ``enhanced_recon_inference.ipynb``, which prompts with
predicted captions and keeps 13 sigmas) runs their sgm SDXL engine:

* input: each image resized to 768² (torchvision's tensor ``Resize``: bilinear; antialiasing does nothing when
  upsampling), VAE-encoded (a posterior sample, scaled by the VAE's 0.13025);
* schedule: sgm's ``LegacyDDPMDiscretization`` over 25 steps = diffusers' Euler with ``"trailing"`` spacing,
  the scheduler of :func:`~brainit_pl.models.unclip.unclip_scheduler` (the authors reuse the unCLIP's sampler
  config here too). Their ``img2img_timepoint = 9`` keeps ``sigmas[-9:]`` of the 26 sgm sigmas (25 + the final
  0): the latent is noised to the sigma of step 17 (train step 319) and **8** Euler steps run, at train steps
  319, 279, …, 39. In diffusers terms: ``start_step = 17`` of ``num_steps = 25``, i.e. ``strength = 8/25``
  (:func:`refine` passes it so that ``int(25 · strength) = 8`` whatever the float rounding);
* conditioning: the empty prompt against the fixed :data:`NEGATIVE_PROMPT` (theirs, verbatim), classifier-free
  guidance 5 in one UNet call of 2B per step (negative half first, as sgm's ``VanillaCFG``); the vector
  condition is original size (768, 768), crop (0, 0), target size (1024, 1024) for both halves. (They encode
  the empty prompt with stock CLIP-L/bigG, not the checkpoint's encoders: the same for SDXL base);
* output: decoded, clamped to [0, 1], resized to 224² with skimage's ``resize(..., anti_aliasing=True)`` as the
  authors save them (torch's antialiased bilinear differs from it by ~0.7 grey levels on average).

The authors' checkpoint is ZavyChromaXL v3.0 (``zavychromaxl_v30.safetensors``, a community SDXL fine-tune);
brainit-pl's default is SDXL base 1.0 (``WEIGHT_FILES["sdxl-base"]``). Any SDXL-architecture checkpoint loads:

* a **diffusers folder**: ``model_index.json`` plus ``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
  tokenizer_2/ scheduler/`` with their weights;
* a **single file** (``.safetensors`` in the original sgm layout) plus a **config folder**: the same layout
  without the weights (configs and tokenizer files only), because diffusers 0.42 builds every component from
  those configs and, offline, cannot fetch them. Default: ``stable-diffusion-xl-base-1.0/`` in the weights
  folder; get it with ``hf download stabilityai/stable-diffusion-xl-base-1.0 --include "*.json" "*.txt"
  --local-dir WEIGHTS/stable-diffusion-xl-base-1.0``.

Tiny twin: the same pipeline class with a tiny UNet, the tiny SDXL VAE of :mod:`brainit_pl.models.unclip`, two tiny CLIP text
encoders of different widths and byte-level tokenizers, built in code (:func:`build_refiner` ``tiny=True``);
``save_pretrained`` writes it as a diffusers folder that :func:`build_refiner` reads back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from brainit_pl.backbones.frozen import seeded
from brainit_pl.backbones.weights import resolve_weights, weights_folder
from brainit_pl.errors import BrainITError, require
from brainit_pl.metrics.protocols import resize_bilinear
from brainit_pl.models.unclip import TINY_UNET_CONFIG as TINY_UNCLIP_UNET_CONFIG
from brainit_pl.models.unclip import build_unclip_vae, unclip_scheduler

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

log = logging.getLogger(__name__)

WEIGHTS_KEY = "sdxl-base"  # the checkpoint's entry in backbones.weights.WEIGHT_FILES
CONFIG_DIR = "stable-diffusion-xl-base-1.0"  # the config folder of a single file, in the weights folder
IMAGE_SIZE = 768
OUTPUT_SIZE = 224
NUM_STEPS = 25
START_STEP = 17  # the authors' sigmas[-9:] of 25 + 1: 8 steps run
GUIDANCE_SCALE = 5.0
TARGET_SIZE = 1024  # the authors' target_size_as_tuple (original size = the 768² input, crop = 0)
# The authors' negative prompt, verbatim (brainit-fmri enhance_recons = MindEye2 enhanced_recon_inference).
NEGATIVE_PROMPT = (
    "painting, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, deformed, ugly, blurry, "
    "bad anatomy, bad proportions, extra limbs, cloned face, skinny, glitchy, double torso, extra arms, "
    "extra hands, mangled fingers, missing lips, ugly face, distorted face, extra legs, anime"
)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LAYOUT = (
    "expected a diffusers SDXL folder (model_index.json and unet/, vae/, text_encoder/, text_encoder_2/, "
    "tokenizer/, tokenizer_2/, scheduler/ with weights) or a single .safetensors SDXL checkpoint plus a config "
    f"folder of that layout without weights (default WEIGHTS/{CONFIG_DIR}; get it with `hf download "
    'stabilityai/stable-diffusion-xl-base-1.0 --include "*.json" "*.txt" --local-dir '
    f"WEIGHTS/{CONFIG_DIR}`)"
)
# Key prefixes of an SDXL single file (sgm layout): UNet, VAE, CLIP ViT-L (HF layout), OpenCLIP bigG.
SINGLE_FILE_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
)

BOS, EOS, PAD_2 = "<|startoftext|>", "<|endoftext|>", "!"  # CLIP's specials; OpenCLIP's padding token
# Tiny twins: CLIP ViT-L's text tower (quick-GELU, pad = EOS) and bigG's (GELU, projection, pad = "!"),
# of different widths as in SDXL, so that a swap of the two fails.
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TINY_TEXT_CONFIG_2: dict[str, Any] = {
    **TINY_TEXT_CONFIG,
    "hidden_size": 48,
    "intermediate_size": 61,
    "hidden_act": "gelu",
    "projection_dim": 48,
}
# SDXL's UNet structure (unCLIP's tiny twin) reading both encoders: cross-attention 32 + 48, vector =
# bigG's pooled text (48) + 6 × 256 (original size, crop, target size).
TINY_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNCLIP_UNET_CONFIG,
    "cross_attention_dim": TINY_TEXT_CONFIG["hidden_size"] + TINY_TEXT_CONFIG_2["hidden_size"],
    "projection_class_embeddings_input_dim": TINY_TEXT_CONFIG_2["projection_dim"] + 6 * 256,
}


def build_refiner(
    pretrained: str | Path | None = None,
    *,
    config: str | Path | None = None,
    tiny: bool = False,
    seed: int = 0,
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionXLImg2ImgPipeline:
    """The SDXL img2img pipeline, from local files only, with the authors' Euler schedule.

    Args:
        pretrained: a diffusers SDXL folder or a single-file SDXL checkpoint (see the module docstring).
            ``None``: the real model reads ``sd_xl_base_1.0.safetensors`` from the weights folder; the tiny
            twin is built in code with seeded random weights.
        config: the config folder of a single file (default ``WEIGHTS/stable-diffusion-xl-base-1.0``);
            ignored for a folder.
        tiny: build the tiny twin; ignored when ``pretrained`` is given (a saved twin loads as a folder).
        seed: seed of the tiny twin's random weights.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).
        device: where the pipeline goes (default CPU).
        dtype: the weights' dtype (default float32). In float16, diffusers runs the SDXL VAE in float32 (its
            config's ``force_upcast``), as sgm does (``disable_first_stage_autocast``).

    Returns:
        A ``StableDiffusionXLImg2ImgPipeline`` with :func:`~brainit_pl.models.unclip.unclip_scheduler` as its
        scheduler and no watermarker.

    Raises:
        BrainITError: a missing file or folder (named, with the expected layout and the download source), a
            folder that is not an SDXL pipeline, or a checkpoint that does not fit its configs.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if tiny and pretrained is None:
        pipe, source = _tiny_pipeline(seed), "the tiny twin"
    else:
        try:
            path = resolve_weights(WEIGHTS_KEY, pretrained, weights_dir=weights_dir)
        except BrainITError as err:
            raise BrainITError(f"{err}; {LAYOUT}") from None
        kwargs = {"local_files_only": True, "add_watermarker": False, "dtype": dtype}
        if path.is_dir():
            _check_pipeline_folder(path, what="SDXL pipeline folder")
            pipe = _load(StableDiffusionXLImg2ImgPipeline.from_pretrained, path, **kwargs)
        else:
            folder = Path(config).expanduser() if config else weights_folder(weights_dir) / CONFIG_DIR
            _check_pipeline_folder(folder, what=f"config folder of {path}")
            _check_single_file(path)
            pipe = _load(
                StableDiffusionXLImg2ImgPipeline.from_single_file, path, config=str(folder), **kwargs
            )
        log.info("loaded the SDXL refiner from %s", path)
        source = str(path)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    require(
        prediction == "epsilon",
        f"{source}: its scheduler config predicts {prediction}, not epsilon: not an SDXL base model; {LAYOUT}",
    )
    pipe.scheduler = unclip_scheduler()  # sgm's LegacyDDPM sigmas, as the authors' sampler config
    return pipe.to(device or "cpu", dtype)


@torch.no_grad()
def refine(
    pipe: StableDiffusionXLImg2ImgPipeline,
    images: Tensor,
    *,
    size: int = IMAGE_SIZE,
    num_steps: int = NUM_STEPS,
    start_step: int = START_STEP,
    guidance_scale: float = GUIDANCE_SCALE,
    negative_prompt: str = NEGATIVE_PROMPT,
    generator: torch.Generator | None = None,
    out_size: int = OUTPUT_SIZE,
    progress: bool = True,
) -> Tensor:
    """Refine a batch of images with SDXL img2img, as the authors' ``enhance_recons``.

    Args:
        pipe: from :func:`build_refiner`.
        images: (B, 3, H, W) images in [0, 1] (the unCLIP output), resized to ``size``.
        size: side of the images SDXL sees (768; a multiple of the VAE's downsampling, 8).
        num_steps: steps of the full Euler schedule.
        start_step: schedule step the encoded image is noised to; the ``num_steps − start_step`` after it run.
        guidance_scale: classifier-free guidance weight (≤ 1: no guidance, one UNet pass per step).
        negative_prompt: the unconditional prompt (the positive prompt is empty).
        generator: seeds the VAE posterior sample and the noise.
        out_size: side of the returned images.
        progress: show a progress bar over the steps.

    Returns:
        (B, 3, out_size, out_size) float32 images in [0, 1], on the device of ``images``.
    """
    require(
        images.ndim == 4 and images.shape[1] == 3,
        f"expected images (B, 3, H, W) to refine, got {tuple(images.shape)}",
    )
    require(images.is_floating_point(), f"expected float images in [0, 1], got {images.dtype}")
    low, high = images.min().item(), images.max().item()
    require(0 <= low and high <= 1, f"images to refine must be in [0, 1], got [{low:.3g}, {high:.3g}]")
    require(0 <= start_step < num_steps, f"start_step must be in [0, {num_steps}), got {start_step}")
    require(
        size > 0 and size % pipe.vae_scale_factor == 0,
        f"size must be a positive multiple of {pipe.vae_scale_factor}, got {size}",
    )
    device, batch = pipe._execution_device, images.shape[0]
    guided = guidance_scale > 1  # diffusers' rule: no unconditional pass at all otherwise
    # Once per batch: the two prompts through both text encoders, repeated B times.
    prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt="",
        device=device,
        num_images_per_prompt=batch,
        do_classifier_free_guidance=guided,
        negative_prompt=negative_prompt,
    )
    x = resize_bilinear(images.float(), size).clamp(0, 1).to(device)  # (B, 3, size, size)
    # diffusers runs int(num_steps · strength) steps; the 0.5 keeps float rounding from dropping one.
    strength = min(1.0, (num_steps - start_step + 0.5) / num_steps)
    pipe.set_progress_bar_config(desc="SDXL refine", leave=False, disable=None if progress else True)
    out = pipe(
        image=x,
        strength=strength,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        prompt_embeds=prompt,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        original_size=(size, size),
        target_size=(TARGET_SIZE, TARGET_SIZE),
        negative_original_size=(size, size),
        negative_target_size=(TARGET_SIZE, TARGET_SIZE),
        generator=generator,
        output_type="pt",
    ).images  # (B, 3, size, size) in [0, 1]
    return _skimage_resize(out, out_size).to(images.device)


def _skimage_resize(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 3, size, size) float32 by skimage (Gaussian prefilter, bilinear), on the CPU."""
    from skimage.transform import resize

    if images.shape[-2:] == (size, size):
        return images.float().cpu()
    arrays = images.float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    out = [resize(a, (size, size), order=1, anti_aliasing=True) for a in arrays]  # each (size, size, 3)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().clamp(0, 1)  # (B, 3, size, size)


def _load(loader: Any, path: Path, **kwargs: Any) -> StableDiffusionXLImg2ImgPipeline:
    """Run a diffusers loader; any failure becomes one BrainITError line naming the file and the layout."""
    try:
        return loader(str(path), **kwargs)
    except Exception as err:  # diffusers raises OSError, ValueError, KeyError, … for a bad checkpoint
        detail = " ".join(str(err).split())[:400]
        raise BrainITError(
            f"cannot load an SDXL pipeline from {path}: {type(err).__name__}: {detail}; {LAYOUT}"
        ) from err


def _check_pipeline_folder(folder: Path, *, what: str) -> None:
    """Require a diffusers SDXL (base) layout: model_index.json naming every component, and its subfolders."""
    index = folder / "model_index.json"
    require(folder.is_dir(), f"missing {what} {folder}; {LAYOUT}")
    require(index.is_file(), f"{folder} has no model_index.json, so it is not a diffusers {what}; {LAYOUT}")
    try:
        entries = json.loads(index.read_text())
    except ValueError as err:
        raise BrainITError(f"{index} is not valid JSON ({err}); {LAYOUT}") from None
    name = entries.get("_class_name", "?")
    missing = [c for c in COMPONENTS if not (isinstance(entries.get(c), list) and entries[c][0])]
    require(
        str(name).startswith("StableDiffusionXL") and not missing,
        f"{folder} is a {name} folder without {', '.join(missing) or 'the SDXL class'}, not an SDXL base "
        f"pipeline (the SDXL refiner model has no text_encoder; Brain-IT refines with a base model); {LAYOUT}",
    )
    absent = [c for c in COMPONENTS if not (folder / c).is_dir()]
    require(not absent, f"{what} {folder} lacks the subfolders {absent}; {LAYOUT}")


def _check_single_file(path: Path) -> None:
    """Require the sgm key layout of an SDXL checkpoint in a ``.safetensors`` file (keys only, no tensors)."""
    if path.suffix != ".safetensors":  # pickles are checked by diffusers' own reader (wrapped by _load)
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:
        raise BrainITError(f"cannot read {path} as safetensors: {err}; {LAYOUT}") from None
    absent = [p for p in SINGLE_FILE_PREFIXES if not any(k.startswith(p) for k in keys)]
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})[:8]
    require(
        not absent,
        f"{path} is not an SDXL single-file checkpoint: no {absent} keys (found {len(keys)} tensors with "
        f"prefixes {prefixes}); {LAYOUT}",
    )


def _tiny_pipeline(seed: int) -> StableDiffusionXLImg2ImgPipeline:
    """The tiny twin: every SDXL component, seeded random weights, offline."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _byte_vocab()
    # CLIP pools its text at the first EOS token: the configs must know the twin vocabulary's ids.
    ids = {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS]}
    with seeded(seed):
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
        text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG, **ids, pad_token_id=vocab[EOS])).eval()
        config_2 = CLIPTextConfig(**TINY_TEXT_CONFIG_2, **ids, pad_token_id=vocab[PAD_2])
        text_2 = CLIPTextModelWithProjection(config_2).eval()
    return StableDiffusionXLImg2ImgPipeline(
        vae=build_unclip_vae(True, seed=seed + 1),
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=_tiny_tokenizer(vocab, pad_token=EOS),  # CLIP ViT-L pads with EOS
        tokenizer_2=_tiny_tokenizer(vocab, pad_token=PAD_2),  # OpenCLIP pads with token 0, "!"
        unet=unet,
        scheduler=unclip_scheduler(),
        add_watermarker=False,
    )


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, each symbol also as a word end, plus the two specials (514 tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def _tiny_tokenizer(vocab: dict[str, int], *, pad_token: str) -> Any:
    """A CLIP tokenizer over ``vocab`` with no merges: every word splits into bytes."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=77,
    )
