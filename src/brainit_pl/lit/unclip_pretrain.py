"""unCLIP pretraining at twin scale: the tiny VAE and the tiny unCLIP UNet learned from a store's images.

MindEye2's unCLIP is SDXL fine-tuned to read OpenCLIP ViT-bigG patch tokens instead of text (MindEye2,
Scotti et al. 2024, §2.4): a diffusion model of images conditioned on the image's own CLIP tokens. With no
pretrained weights on the machine, the demo's tiny twin (:data:`~brainit_pl.models.unclip.TINY_UNET_CONFIG`,
:data:`~brainit_pl.models.unclip.TINY_VAE_CONFIG`) would otherwise sample from random weights, and its
images look like nothing. This module trains the same two parts on the simulated stimuli, in two phases of
one ``brainit-pl fit`` run (``configs/sim/unclip_pretrain_demo.yaml``):

1. **VAE** (epochs ``0 … vae_epochs − 1``): the VAE as an autoencoder of the images at ``image_size``,
   x ← 2x − 1, loss = mean |x − D(z)| over pixels + ``kl_weight`` · KL(q(z|x) ‖ N(0, I)) summed over the
   latent and divided by the pixel count: LDM's autoencoder loss (L1 + 1e-6 KL, per image sums) without its
   LPIPS and GAN terms, which a CPU demo cannot afford. At the end of the phase the latent space is rescaled
   in place (the mean half of ``quant_conv`` × c, its log-variance half + 2 log c, ``post_quant_conv``'s
   input ÷ c: the same autoencoder) so that the latents' standard deviation is 1/0.13025, which makes the
   fixed SDXL ``scaling_factor`` of the config give unit-variance diffusion latents, as it does for SDXL.
2. **UNet** (the remaining epochs; the VAE frozen): the ε-prediction loss of stage 2
   (:mod:`brainit_pl.lit.stage2`: the same DDPM schedule, offset noise, uniform timesteps, vector
   condition), conditioned on the image's true CLIP tokens (``clip_tokens``, the cache that
   ``extract-features`` writes and the semantic BIT learns to predict). With probability ``cond_dropout`` a
   sample's tokens are replaced by N(0, 1) tokens: the unconditional input of the sampler's classifier-free
   guidance (:class:`~brainit_pl.models.unclip.UnCLIPSampler`), as unCLIP training drops its conditioning.

The trained pair is written at the end of ``fit`` as an sgm checkpoint (``export``;
:func:`~brainit_pl.models.sgm_keys.save_sgm_checkpoint`), the format of MindEye2's ``unclip6`` file, so
``load_unclip(path, tiny=True)``, stage 2 (``model.init_args.unclip: PATH`` with ``tiny_unclip: true``) and
``reconstruct --unclip PATH --tiny-unclip`` read it unchanged. ``init`` starts from such a file (e.g. only
the UNet phase, ``vae_epochs: 0``, on a VAE trained before).

Image size: the method samples at 256² (32² latents). On two CPU cores the VAE at 256² costs ~6 s per batch
of 16, so the demo trains and samples at 64² (8² latents; the simulated demo stimuli are drawn at 128²): set
the same ``image_size`` in stage 2 (``model.init_args.image_size``), which its sampler then uses.

Measured (``benchmarks/unclip_twin.py``, ``benchmarks/RESULTS.md``): on the demo store the demo config takes ~3.2
minutes on 2 CPU cores; the VAE then works and img2img from a low-level image keeps that image, but the UNet
does not yet read the tokens (that starts after ~3,000 steps, 4× the demo's).

Optimisation: AdamW with the VAE and the UNet as two parameter groups (``vae_lr``, ``lr``), each with a
linear warm-up at the start of its phase (and, with ``cosine``, a decay to 0 over the phase: in the demo's
short run it ended worse than constant rates, 0.269 vs 0.188 validation ε-MSE); a group whose
part is idle in a phase gets no gradient, which AdamW skips (no decay, no moment update). Single device:
the idle part's parameters would make DDP wait for gradients that never come (use
``strategy: ddp_find_unused_parameters_true`` to run it under DDP anyway). Draws (posterior samples,
noise, timesteps, dropout) come from a generator keyed by (seed, epoch, batch, rank), as in stage 2.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from brainit_pl.errors import require
from brainit_pl.lit.guards import check_finite_loss
from brainit_pl.lit.stage2 import NUM_TRAIN_TIMESTEPS, ddpm_scheduler, diffusion_noise
from brainit_pl.models.sgm_keys import save_sgm_checkpoint
from brainit_pl.models.unclip import OFFSET_NOISE, UnCLIPSampler, load_unclip, vector_condition

log = logging.getLogger(__name__)

DEMO_IMAGE_SIZE = 64  # the CPU demo's side (module docstring)


class UnCLIPPretrainModule(L.LightningModule):
    """Pretrain the unCLIP VAE, then the UNet on CLIP tokens, from a store's images (module docstring).

    Args:
        n_voxels: linked from the DataModule by ``brainit-pl fit``; unused (images and tokens only).
        init: an sgm checkpoint to start from (``None``: the seeded random twin).
        tiny: the tiny twin's architecture (the real one is 2.6B parameters; nothing here is tuned for it).
        vae_epochs: epochs of the VAE phase; the UNet trains in the epochs after (``trainer.max_epochs``).
        image_size: side of the VAE input (64 → 8² latents; the method's is 256).
        lr: AdamW learning rate of the UNet.
        vae_lr: AdamW learning rate of the VAE (default ``lr``).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up (optimizer steps, from 1 % of the rates) at the start of each phase.
        cosine: then a half-cosine decay to 0 at the end of each phase (else constant rates).
        kl_weight: weight of the KL term (LDM's 1e-6, per image sums).
        cond_dropout: probability of replacing a sample's tokens by N(0, 1) tokens (unconditional).
        offset_noise: weight of the per-image, per-channel offset noise (stage 2's).
        export: where ``fit`` writes the sgm checkpoint of the result (``None``: not written).
        seed: seed of the VAE/UNet random init (with ``init=None``) and of the training draws.
    """

    def __init__(
        self,
        n_voxels: dict[int, int] | None = None,
        init: str | None = None,
        tiny: bool = True,
        vae_epochs: int = 2,
        image_size: int = DEMO_IMAGE_SIZE,
        lr: float = 1e-3,
        vae_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
        cosine: bool = False,
        kl_weight: float = 1e-6,
        cond_dropout: float = 0.1,
        offset_noise: float = OFFSET_NOISE,
        export: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        require(vae_epochs >= 0, f"vae_epochs must be >= 0, got {vae_epochs}")
        require(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
        require(0 <= cond_dropout < 1, f"cond_dropout must be in [0, 1), got {cond_dropout}")
        require(
            image_size % 8 == 0 and image_size >= 16, f"image_size must be a multiple of 8, got {image_size}"
        )
        self.save_hyperparameters(ignore=["n_voxels"])
        self.unet, self.vae = load_unclip(init, tiny=tiny, seed=seed)
        self.noise_scheduler = ddpm_scheduler()
        # Latent statistics of the last VAE epoch (sum, sum of squares, count) and whether the latent space
        # was rescaled: buffers, so a run resumed at the phase switch neither forgets nor rescales twice.
        self.register_buffer("latent_moments", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("latent_rescaled", torch.tensor(vae_epochs == 0))
        self.train()

    # ------------------------------------------------------------------------------------------ parts
    @property
    def phase(self) -> str:
        """``"vae"`` or ``"unet"``: what the current epoch trains."""
        return "vae" if self.current_epoch < self.hparams.vae_epochs else "unet"

    def sampler(self, **kwargs: Any) -> UnCLIPSampler:
        """An :class:`~brainit_pl.models.unclip.UnCLIPSampler` on the trained UNet and VAE at ``image_size``."""
        return UnCLIPSampler(self.unet, self.vae, image_size=self.hparams.image_size, **kwargs)

    def images(self, batch: dict[str, Tensor]) -> Tensor:
        """A batch's stimuli → (B, 3, S, S) in [-1, 1]: the smallest stored size >= S (``image_112`` or
        ``image_224``), anti-aliased resize as stage 2's VAE input."""
        size = self.hparams.image_size
        key = "image_112" if size <= 112 and "image_112" in batch else "image_224"
        x = batch[key].float()
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x * 2 - 1

    def vae_loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The autoencoder loss of a batch: (total, mean |x − x̂|, KL per image), and the latent samples."""
        x = self.images(batch)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)  # (B, 4, h, w), unscaled
        rec = self.vae.decode(z).sample
        l1 = (rec.float() - x).abs().mean()
        kl = posterior.kl().float().mean()  # per image: summed over the latent
        total = l1 + self.hparams.kl_weight * kl / x[0].numel()  # LDM: Σ|x − x̂| + w·KL, per pixel here
        return total, kl, z.detach()

    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """A batch's stimuli → (B, 4, h, w) scaled latents: a posterior sample × ``scaling_factor`` (stage 2's)."""
        posterior = self.vae.encode(self.images(batch)).latent_dist
        return posterior.sample(generator=generator).float() * self.vae.config.scaling_factor

    def diffusion_loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """Stage 2's ε-prediction MSE with the true CLIP tokens (dropped to N(0, 1) tokens at ``cond_dropout``)."""
        latents = self.encode(batch, generator)
        b, dev = len(latents), self.device
        noise = diffusion_noise(tuple(latents.shape), self.hparams.offset_noise, generator, dev)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=generator, device=dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        tokens = batch["clip_tokens"].to(dev, torch.float32)  # (B, T, D)
        drop = torch.rand(b, generator=generator, device=dev) < self.hparams.cond_dropout
        uncond = torch.randn(tokens.shape, generator=generator, device=dev)
        tokens = torch.where(drop[:, None, None], uncond, tokens)
        added = vector_condition(self.unet, b, device=dev)
        eps = self.unet(noisy, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        return F.mse_loss(eps.float(), noise)

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(key)

    # ------------------------------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        """Check that the DataModule delivers the stimuli and (for the UNet phase) CLIP tokens of the right width."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if dm is None or stage not in ("fit", "validate"):
            return
        size = self.hparams.image_size
        require(
            any(s >= min(size, 224) for s in getattr(dm, "image_sizes", ())),
            f"unCLIP pretraining at {size}² reads stimuli at least that large: set data.image_sizes: [112] "
            "(image_size <= 112) or [224]",
        )
        max_epochs = self.trainer.max_epochs
        unet_phase = max_epochs is None or max_epochs < 0 or max_epochs > self.hparams.vae_epochs
        require(
            unet_phase or not self.hparams.export or stage != "fit",
            f"trainer.max_epochs ({max_epochs}) ends within the VAE phase (model.init_args.vae_epochs "
            f"{self.hparams.vae_epochs}): nothing to export; train longer or unset model.init_args.export",
        )
        if unet_phase:
            shapes = getattr(dm, "feature_shapes", {})
            require("clip" in shapes, "the UNet phase reads the CLIP tokens: set data.features: [clip]")
            width = self.unet.config.cross_attention_dim
            require(
                shapes["clip"][1] == width,
                f"the store's CLIP cache holds {shapes['clip'][1]}-wide tokens but the UNet reads {width}-wide "
                "ones (the tiny twin pairs with `extract-features --tiny`)",
            )

    def on_train_epoch_start(self) -> None:
        vae_training = self.phase == "vae"
        self.vae.train(vae_training).requires_grad_(vae_training)
        self.unet.requires_grad_(not vae_training)
        if self.current_epoch == self.hparams.vae_epochs - 1:
            self.latent_moments.zero_()  # the last VAE epoch measures the latents
        if not vae_training and not bool(self.latent_rescaled):
            self._rescale_latents()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        key = ((hp.seed * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx) * 4099 + self.global_rank
        gen, b = self._generator(key), len(batch["nsd_id"])
        if self.phase == "vae":
            loss, kl, z = self.vae_loss(batch, gen)
            with torch.no_grad():
                z = z.double()
                self.latent_moments += torch.stack([z.sum(), z.square().sum(), z.new_tensor(z.numel())])
            self.log("train/kl", kl, batch_size=b)
        else:
            loss = self.diffusion_loss(batch, gen)
        check_finite_loss(self, loss, batch, batch_idx, f"{self.phase} loss", "lower model.init_args.lr")
        self.log(f"train/{self.phase}_loss", loss, batch_size=b, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        gen = self._generator((self.hparams.seed + 7_919) * 1_000_003 + batch_idx * 4099 + self.global_rank)
        b = len(batch["nsd_id"])
        if self.phase == "vae":
            loss = self.vae_loss(batch, gen)[0]
        else:
            loss = self.diffusion_loss(batch, gen)
        self.log(f"val/{self.phase}_loss", loss, batch_size=b, sync_dist=True, prog_bar=True)

    @torch.no_grad()
    def _rescale_latents(self) -> None:
        """Scale the VAE's latent space so that its std is 1/``scaling_factor`` (module docstring)."""
        moments = self.trainer.strategy.reduce(self.latent_moments.clone(), reduce_op="sum")
        total, squares, n = (float(v) for v in moments)
        require(n > 1, "no latent statistics from the VAE phase (was it skipped on resume?)")
        std = math.sqrt(max(squares / n - (total / n) ** 2, 1e-12))
        c = (1.0 / self.vae.config.scaling_factor) / std
        rescale_latent_space(self.vae, c)
        self.latent_rescaled.fill_(True)
        log.info("VAE latents: std %.4g → %.4g (× %.4g), so scaled latents have unit std", std, std * c, c)

    # -------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = [
            {"params": list(self.vae.parameters()), "lr": hp.vae_lr or hp.lr},
            {"params": list(self.unet.parameters()), "lr": hp.lr},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total, per_epoch = self._stepping_batches()
        if total is None:  # no trainer (or an unbounded run): constant rates after the warm-up
            phases = [(0, None), (0, None)]
        else:
            switch = per_epoch * hp.vae_epochs
            phases = [(0, switch), (switch, total)]
        factors = [
            partial(_phase_factor, start=a, end=b, warmup=hp.warmup_steps, cosine=hp.cosine)
            for a, b in phases
        ]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _stepping_batches(self) -> tuple[int | None, int]:
        """(optimizer steps of the whole run, steps per epoch), or (None, 0) without a bounded trainer."""
        trainer = self._trainer
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 0:
            return None, 0
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return None, 0
        return int(total), int(total // trainer.max_epochs)

    def on_fit_end(self) -> None:
        """Write the sgm checkpoint of the trained pair to ``export`` (rank 0)."""
        if self.hparams.export and self.global_rank == 0:
            path = self.export(self.hparams.export)
            log.info("wrote the pretrained unCLIP twin to %s", path)

    def export(self, path: str | Path) -> Path:
        """Write the UNet and the VAE as an sgm checkpoint (the layout of MindEye2's unclip6 file)."""
        require(
            bool(self.latent_rescaled),
            "the VAE phase did not finish (its latent space is not rescaled yet): train into the UNet phase "
            "before exporting",
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_sgm_checkpoint(tmp, self.unet, self.vae)
        tmp.replace(path)
        return path


def _phase_factor(step: int, *, start: int, end: int | None, warmup: int, cosine: bool) -> float:
    """The learning-rate factor of a phase's parameter group at optimizer step ``step`` of the run.

    Linear warm-up from 1 % over ``warmup`` steps from ``start``; then 1, or with ``cosine`` a half cosine to
    0 at ``end``. Outside the phase the group has no gradient, so the factor there does not matter.
    """
    k = max(step - start, 0)
    factor = 0.01 + 0.99 * k / warmup if warmup and k < warmup else 1.0
    if cosine and end is not None and end > start + warmup and k >= warmup:
        progress = min((k - warmup) / (end - start - warmup), 1.0)
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def rescale_latent_space(vae: torch.nn.Module, c: float) -> None:
    """Multiply a diffusers ``AutoencoderKL``'s latents by ``c`` without changing what it computes.

    ``quant_conv`` (1×1, 2·C → 2·C: means, then log-variances): means × c, log-variances + 2 log c;
    ``post_quant_conv`` (1×1, C → C) reads z/c.
    """
    require(c > 0 and math.isfinite(c), f"the latent scale must be a positive number, got {c}")
    channels = vae.config.latent_channels
    quant, post = vae.quant_conv, vae.post_quant_conv
    require(
        quant is not None and post is not None,
        "the VAE has no quant_conv/post_quant_conv to fold a scale into",
    )
    quant.weight[:channels] *= c
    quant.bias[:channels] *= c
    quant.bias[channels:] += 2 * math.log(c)
    post.weight /= c
