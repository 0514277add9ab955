"""The unCLIP stage: MindEye2's SDXL-unCLIP through diffusers (docs/method.md §6.2).

The model is an SDXL-base ``UNet2DConditionModel`` whose cross-attention reads 256 OpenCLIP ViT-bigG
patch tokens (width 1664) instead of text, plus the SDXL VAE. Both are built from configs in code
(:data:`UNET_CONFIG`, :data:`VAE_CONFIG`; tiny twins :data:`TINY_UNET_CONFIG`, :data:`TINY_VAE_CONFIG`)
and filled from MindEye2's sgm checkpoint (:func:`load_unclip`, key conversion in :mod:`.sgm_keys`).

Sampling (:class:`UnCLIPSampler`) reproduces the authors' sgm ``EulerEDMSampler`` with
``LegacyDDPMDiscretization`` (``tests/test_unclip_reference.py`` replays a run recorded from their code):

* sigmas (:func:`legacy_ddpm_sigmas`): sgm picks train steps ``linspace(999, 0, 50, endpoint=False)
  .astype(int)`` = 999, 979, …, 19 of the scaled-linear (0.00085 → 0.012) schedule, in float64, cast to
  float32 before the square root. diffusers' ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"``
  (:func:`unclip_scheduler`, used by the refinement) has the same steps but float32 betas: its sigmas are
  off by up to 6e-6, so the sampler computes sgm's;
* step: sgm's denoiser D(x, σ) = x − σ·ε(x/√(σ²+1), t(σ)) and Euler update x += (σ' − σ)(x − D)/σ
  (:func:`euler_sample`);
* classifier-free guidance 5 with Gaussian-noise tokens as the unconditional input, on ε (sgm guides the
  denoised x, which is affine in ε with the same x, so the two are the same);
* start: the authors' code noises the latent z to step ``start_step`` (14 of 50: 36 steps remain) as
  x = z + σ_start·(n + 0.04·n_B), with a per-image "offset noise" n_B as in training (their default,
  kept: ``offset_noise``). Without an init image z is itself N(0, 1) noise and all 50 steps run;
* vector condition: sgm concatenates 256-d sinusoidal embeddings of original_size (h, w) and crop
  (top, left): diffusers' ``text_time`` embedding of ``time_ids = [h, w, top, left]`` with an empty (0-wide)
  pooled-text part, 4 × 256 = ``projection_class_embeddings_input_dim`` 1024 (:func:`vector_condition`).

Output: the decoded 256² images, clamped to [0, 1], then the authors' contrast shrink
x ← (x − 0.5)·0.8 + 0.5. Callers resize: 224² for the metrics, 768² for the SDXL refinement.
Precision: the UNet may run in float16/bfloat16 (the authors use autocast); the latents and the Euler
update stay float32, and the SDXL VAE should stay float32 (it overflows in float16; sgm disables autocast
for it too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from brainit_pl.backbones.frozen import seeded
from brainit_pl.backbones.weights import load_checked, resolve_weights
from brainit_pl.errors import require
from brainit_pl.models.sgm_keys import read_sgm_checkpoint, sgm_to_diffusers

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

log = logging.getLogger(__name__)

WEIGHTS_KEY = "mindeye2-unclip6"  # the checkpoint's entry in backbones.weights.WEIGHT_FILES
LATENT_SCALE = 0.13025  # the SDXL VAE's latent scale (sgm ``scale_factor``)
IMAGE_SIZE = 256
ORIGINAL_SIZE = (256, 256)  # the vector condition of stage-2 training and of sampling
CROP = (0, 0)
NUM_STEPS = 50
START_STEP = 14
GUIDANCE_SCALE = 5.0
CONTRAST = 0.8
OFFSET_NOISE = 0.04

# SDXL base with 1664-wide cross-attention and a 1024-d vector condition. ``attention_head_dim`` is, by a
# diffusers naming quirk, the number of heads: 320/5 = 640/10 = 1280/20 = 64 channels per head.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 1664,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 1024,
}
# The same structure with 8 channels per head; cross_attention_dim = the tiny CLIP twin's width (32).
TINY_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "block_out_channels": (8, 16, 32),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (1, 2, 4),
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
}
VAE_CONFIG: dict[str, Any] = {  # the SDXL VAE: 3 downsamplings, 256² → 4 × 32²
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": LATENT_SCALE,
    "force_upcast": True,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **VAE_CONFIG,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


class UnCLIPModels(NamedTuple):
    """The unCLIP UNet (trainable in stage 2) and the VAE (frozen)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL


def build_unclip_unet(
    tiny: bool = False, *, seed: int = 0, device: str | torch.device | None = None
) -> UNet2DConditionModel:
    """The unCLIP UNet with random weights (seeded) or, on ``device="meta"``, no weights at all.

    Returns:
        A ``UNet2DConditionModel`` of :data:`UNET_CONFIG` (2.50B parameters) or :data:`TINY_UNET_CONFIG`.
    """
    from diffusers import UNet2DConditionModel

    with seeded(seed), torch.device(device or "cpu"):
        return UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else UNET_CONFIG)).eval()


def build_unclip_vae(
    tiny: bool = False, *, seed: int = 0, device: str | torch.device | None = None
) -> AutoencoderKL:
    """The SDXL VAE (or its twin), frozen, with random weights (seeded) or none on ``device="meta"``."""
    from diffusers import AutoencoderKL

    with seeded(seed), torch.device(device or "cpu"):
        return AutoencoderKL(**(TINY_VAE_CONFIG if tiny else VAE_CONFIG)).eval().requires_grad_(False)


def load_unclip(
    pretrained: str | Path | None = None,
    *,
    tiny: bool = False,
    seed: int = 0,
    weights_dir: str | Path | None = None,
) -> UnCLIPModels:
    """The unCLIP UNet and VAE, from MindEye2's sgm checkpoint.

    Args:
        pretrained: an sgm checkpoint. ``None``: the real model reads ``unclip6_epoch0_step110000.ckpt``
            from the weights folder; the tiny twin gets seeded random weights.
        tiny: use the tiny twin's architecture.
        seed: seed of the tiny twin's random weights.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).

    Returns:
        :class:`UnCLIPModels` on the CPU, in eval mode, VAE frozen.

    Raises:
        BrainITError: a missing file (named, with its source), a file without the sgm layout, or tensors
            whose keys or shapes do not fit the architecture.
    """
    if tiny and pretrained is None:
        return UnCLIPModels(build_unclip_unet(True, seed=seed), build_unclip_vae(True, seed=seed + 1))
    path = resolve_weights(WEIGHTS_KEY, pretrained, weights_dir=weights_dir)
    unet, vae = build_unclip_unet(tiny, device="meta"), build_unclip_vae(tiny, device="meta")
    unet_state, vae_state = sgm_to_diffusers(
        read_sgm_checkpoint(path), unet.config, vae.config, source=str(path)
    )
    label = "tiny" if tiny else "SDXL"
    width = unet.config.cross_attention_dim
    load_checked(unet, unet_state, source=path, arch=f"{label} unCLIP UNet ({width}-wide cross-attention)")
    load_checked(vae, vae_state, source=path, arch=f"{label} VAE")
    log.info("loaded the %s unCLIP UNet and VAE from %s", label, path)
    return UnCLIPModels(unet.eval(), vae.eval().requires_grad_(False))


def unclip_scheduler() -> EulerDiscreteScheduler:
    """Euler over sgm's legacy-DDPM sigmas: 1000 scaled-linear steps, ε-prediction, "trailing" spacing."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",  # = sgm's generate_roughly_equally_spaced_steps (module docstring)
    )


def vector_condition(
    unet: UNet2DConditionModel,
    batch: int,
    *,
    original_size: tuple[int, int] = ORIGINAL_SIZE,
    crop: tuple[int, int] = CROP,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """The UNet's ``added_cond_kwargs`` for the vector condition (original size, crop).

    Args:
        unet: a ``text_time`` UNet (its config gives the widths).
        batch: B, the UNet's batch (2× the images under classifier-free guidance).
        original_size: (h, w).
        crop: (top, left).
        device: where the tensors go.

    Returns:
        ``time_ids`` (B, 4) = [h, w, top, left] and ``text_embeds`` (B, 0): the pooled-text part of SDXL's
        vector, which this unCLIP does not have.
    """
    config = unet.config
    time_ids = torch.tensor([[*original_size, *crop]], dtype=torch.float32, device=device)  # (1, 4)
    text_width = config.projection_class_embeddings_input_dim - 4 * config.addition_time_embed_dim
    require(
        text_width >= 0,
        f"the UNet's vector condition ({config.projection_class_embeddings_input_dim}-d) is narrower than "
        f"4 embeddings of {config.addition_time_embed_dim} (original size and crop)",
    )
    return {
        "text_embeds": torch.zeros(batch, text_width, device=device, dtype=unet.dtype),
        "time_ids": time_ids.expand(batch, -1),
    }


def legacy_ddpm_sigmas(num_steps: int = NUM_STEPS) -> Tensor:
    """sgm's ``LegacyDDPMDiscretization``: the sampler's ``num_steps`` sigmas, descending, then 0.

    Betas ``linspace(√0.00085, √0.012, 1000)²`` and ᾱ = cumprod(1 − β) in float64; train steps
    ``linspace(999, 0, num_steps, endpoint=False).astype(int)`` (999, 979, …, 19 for 50 steps);
    σ = sqrt(float32((1 − ᾱ)/ᾱ)), the cast *before* the square root as sgm does it. diffusers'
    ``EulerDiscreteScheduler`` has the same steps but float32 betas, and sigmas off by up to 6e-6.
    With ``num_steps=1000`` (flipped, zero dropped) it is the denoiser's table: index = train step.

    Returns:
        (num_steps + 1,) float32.
    """
    steps = _legacy_ddpm_steps(num_steps)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[steps]
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).to(torch.float32).sqrt()  # ascending
    return torch.cat([sigmas.flip(0), sigmas.new_zeros(1)])


def _legacy_ddpm_steps(num_steps: int) -> Tensor:
    """The train steps of a ``num_steps`` schedule, ascending (sgm's generate_roughly_equally_spaced_steps)."""
    import numpy as np

    return torch.from_numpy(np.linspace(999, 0, num_steps, endpoint=False).astype(int)[::-1].copy())


def euler_sample(
    predict_noise: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    noise: Tensor,
    *,
    num_steps: int = NUM_STEPS,
    start_step: int = 0,
    progress: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Noise ``latents`` to step ``start_step`` of a ``num_steps`` schedule, then run the remaining steps.

    sgm's ``EulerEDMSampler`` (no churn) over :func:`legacy_ddpm_sigmas` with its ``DiscreteDenoiser``:
    x = latents + σ_start·noise; at each step the network sees x/√(σ²+1) and the train step of σ, the
    denoised estimate is D = x − σ·ε, and x ← x + (σ' − σ)(x − D)/σ.

    Args:
        predict_noise: (scaled sample (B, C, h, w), train timestep (a 0-d float tensor)) → ε (B, C, h, w).
        latents: (B, C, h, w) clean latents (or N(0, 1) noise for a start from scratch).
        noise: (B, C, h, w) noise added with the start sigma.
        num_steps: steps of the full schedule.
        start_step: steps skipped (0: all run).
        progress: show a progress bar over the steps.
        callback: ``callback(i, x)`` with the latents entering step i (i = start_step, …, num_steps; the
            last call gets the result).

    Returns:
        (B, C, h, w) float32 denoised latents.
    """
    require(0 <= start_step < num_steps, f"start_step must be in [0, {num_steps}), got {start_step}")
    sigmas = legacy_ddpm_sigmas(num_steps).tolist()  # Python floats: exact float32 values, any device
    steps = _legacy_ddpm_steps(num_steps).flip(0).tolist()  # descending, steps[i] is the train step of σ_i
    x = latents.float() + noise.float() * sigmas[start_step]
    for i in tqdm(
        range(start_step, num_steps),
        desc="unCLIP",
        unit="step",
        leave=False,
        disable=None if progress else True,
    ):
        if callback is not None:
            callback(i, x)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = torch.tensor(float(steps[i]), device=x.device)
        eps = predict_noise(x / (sigma**2 + 1.0) ** 0.5, t).float()
        denoised = x + eps * -sigma  # EpsScaling: c_skip 1, c_out −σ
        x = x + (sigma_next - sigma) * ((x - denoised) / sigma)
    if callback is not None:
        callback(num_steps, x)
    return x


def _draw_source(
    draws: Callable[[str, tuple[int, ...]], Tensor] | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Callable[[str, tuple[int, ...]], Tensor]:
    """``randn(site, shape, dtype=float32)`` → standard-normal draws on ``device``: replayed or from ``generator``."""
    from diffusers.utils.torch_utils import randn_tensor

    def randn(site: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        if draws is not None:
            return draws(site, shape).to(device, dtype).reshape(shape)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    return randn


def vector_embedding(unet: UNet2DConditionModel, added_cond_kwargs: dict[str, Tensor]) -> Tensor:
    """The vector the UNet's ``text_time`` embedding MLP receives (sgm's ``y``), from its ``added_cond_kwargs``.

    Returns:
        (B, projection_class_embeddings_input_dim): the pooled-text part, then the sinusoidal embeddings
        ([cos | sin]) of the ``time_ids`` in order.
    """
    time_ids, text = added_cond_kwargs["time_ids"], added_cond_kwargs["text_embeds"]
    embeds = unet.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    return torch.cat([text.to(embeds.dtype), embeds], dim=-1)


class UnCLIPSampler:
    """Images from CLIP tokens (and optionally an init image) with the unCLIP model.

    Args:
        unet: the unCLIP UNet (any dtype; its device is used).
        vae: the VAE (float32 advised).
        num_steps: steps of the full Euler schedule.
        start_step: schedule step an init image is noised to (the first ``start_step`` steps are skipped).
        guidance_scale: classifier-free guidance weight.
        image_size: side of the VAE input and of the returned images.
        offset_noise: weight of the per-image offset noise added to the start noise.
        contrast: the final contrast shrink x ← (x − 0.5)·contrast + 0.5 (1: none).
        progress: show a progress bar over the steps.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        *,
        num_steps: int = NUM_STEPS,
        start_step: int = START_STEP,
        guidance_scale: float = GUIDANCE_SCALE,
        image_size: int = IMAGE_SIZE,
        offset_noise: float = OFFSET_NOISE,
        contrast: float = CONTRAST,
        progress: bool = True,
    ) -> None:
        require(0 <= start_step < num_steps, f"start_step must be in [0, {num_steps}), got {start_step}")
        self.unet, self.vae = unet, vae
        self.num_steps, self.start_step, self.guidance_scale = num_steps, start_step, guidance_scale
        self.image_size, self.offset_noise, self.contrast, self.progress = (
            image_size,
            offset_noise,
            contrast,
            progress,
        )
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(
        self,
        tokens: Tensor,
        init_images: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        draws: Callable[[str, tuple[int, ...]], Tensor] | None = None,
        callback: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Sample one image per token set.

        Args:
            tokens: (B, T, D) CLIP patch tokens (T = 256, D = the UNet's cross-attention width).
            init_images: optional (B, 3, H, W) images in [0, 1] (the DIP output), resized to ``image_size``.
            generator: seeds the VAE sample, the unconditional tokens and the noise.
            draws: replaces the standard-normal draws: ``draws(site, shape)``, called in this order with the
                sites ``"posterior"`` (the VAE sample, with an init image) or ``"latents"`` (without),
                ``"uncond"`` (the unconditional tokens), ``"noise"`` and ``"offset"`` ((B, 1, 1, 1)).
                A recorded run can be replayed through it. ``generator`` is then unused.
            callback: ``callback(i, x)`` with the latents entering schedule step i, and the final ones
                (see :func:`euler_sample`).

        Returns:
            (B, 3, image_size, image_size) float32 images in [0.5 − contrast/2, 0.5 + contrast/2].
        """
        unet, device = self.unet, self.unet.device
        width = unet.config.cross_attention_dim
        require(
            tokens.ndim == 3 and tokens.shape[-1] == width,
            f"expected tokens (B, T, {width}), got {tuple(tokens.shape)}",
        )
        batch = tokens.shape[0]
        randn = _draw_source(draws, generator, device)
        if init_images is None:  # from scratch: z ~ N(0, 1) and all steps (the authors' start_step = 0)
            side = self.image_size // self.latent_factor
            shape = (batch, unet.config.in_channels, side, side)
            latents, start = randn("latents", shape), 0
        else:
            require(
                init_images.ndim == 4 and init_images.shape[:2] == (batch, 3),
                f"expected init images ({batch}, 3, H, W) for {batch} token sets, "
                f"got {tuple(init_images.shape)}",
            )
            latents, start = self.encode(init_images, generator=generator, draws=draws), self.start_step
        tokens = tokens.to(device, unet.dtype)
        uncond = randn("uncond", tuple(tokens.shape), tokens.dtype)
        context = torch.cat([uncond, tokens])  # (2B, T, D): unconditional first, as sgm's guider
        added = vector_condition(unet, 2 * batch, device=device)
        noise = randn("noise", tuple(latents.shape))
        noise = noise + self.offset_noise * randn("offset", (batch, 1, 1, 1))

        def predict_noise(x: Tensor, t: Tensor) -> Tensor:
            x2 = torch.cat([x, x]).to(unet.dtype)  # (2B, C, h, w)
            eps = unet(x2, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.float()
            eps_u, eps_c = eps.chunk(2)
            return eps_u + self.guidance_scale * (eps_c - eps_u)

        latents = euler_sample(
            predict_noise,
            latents,
            noise,
            num_steps=self.num_steps,
            start_step=start,
            progress=self.progress,
            callback=callback,
        )
        return ((self.decode(latents) - 0.5) * self.contrast + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        draws: Callable[[str, tuple[int, ...]], Tensor] | None = None,
    ) -> Tensor:
        """(B, 3, H, W) images in [0, 1] → (B, 4, h, w) float32 scaled latents: a posterior sample, as sgm.

        ``draws("posterior", shape)``, if given, replaces the standard-normal draw of the sample.
        """
        require(
            images.min() >= 0 and images.max() <= 1,
            f"init images must be in [0, 1], got [{images.min():.3g}, {images.max():.3g}]",
        )
        vae, size = self.vae, self.image_size
        x = images.to(vae.device, torch.float32)
        if tuple(x.shape[-2:]) != (size, size):  # the authors' plain bilinear resize (DIP 224² → 256²)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        posterior = vae.encode((x * 2 - 1).to(vae.dtype)).latent_dist
        if draws is None:
            sample = posterior.sample(generator=generator)
        else:  # mean + std · n, std = exp(logvar / 2) with logvar clamped to [−30, 20]
            sample = posterior.mean + posterior.std * draws("posterior", tuple(posterior.mean.shape)).to(
                posterior.mean
            )
        return sample.float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 4, h, w) scaled latents → (B, 3, H, W) float32 images clamped to [0, 1]."""
        vae = self.vae
        x = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)
