"""Stage 2, "adapted CLIP" (docs/method.md §5, §7): the semantic BIT and the unCLIP UNet fine-tuned together.

The stage-1 semantic BIT's tokens replace the CLIP tokens as the UNet's cross-attention context, and both
are trained end to end with the standard ε-prediction diffusion loss; the VAE stays frozen. This is the
authors' ``CombinedDiffusionEngine`` around MindEye2's sgm ``DiffusionEngine`` (``unclip6.yaml``:
``StandardDiffusionLoss`` with ``DiscreteSampling`` over ``LegacyDDPMDiscretization``, ``EpsScaling``,
``EpsWeighting``, ``offset_noise_level: 0.04``), written with diffusers parts:

* image: ``image_<source_size>`` → ``image_size`` (256²): with ``source_size: 256`` the store's native 256²
  copy of the 425² stimuli, as the authors read (no resize); ``source_size: 224`` (a departure, for stores
  without that copy: MindEye2's release, the simulator) upsamples the 224² one, anti-aliased bilinear
  → x ← 2x − 1 → frozen VAE, in float32 outside autocast
  (sgm's ``disable_first_stage_autocast``) → a *sample* of the posterior, not its mode (sgm's
  ``AutoencoderKL`` regulariser samples) → × 0.13025;
* noise: n = ε + 0.04 · ε_BC with ε_BC ~ N(0, 1) of shape (B, C, 1, 1), one offset per image *and channel*
  (sgm's training form; the sampler's start noise uses one per image, as the authors' ``unclip_recon``);
* timestep t uniform in {0, …, 999} (``DiscreteSampling``); noisy latent √ᾱ_t·z + √(1−ᾱ_t)·n from
  diffusers' ``DDPMScheduler`` (1000 scaled-linear β, 0.00085 → 0.012). sgm writes it as (z + σ_t·n)/√(σ_t²+1)
  with σ_t = √((1−ᾱ_t)/ᾱ_t), the same number; its ``EpsWeighting`` (σ⁻²) on the denoised x turns the loss
  into MSE(ε̂, n), which is what is computed here (the target includes the offset noise);
* conditioning: ``encoder_hidden_states`` = BIT(betas, voxel_ids) (B, 256, 1664); vector condition
  original_size (256, 256), crop (0, 0) (:func:`~brainit_pl.models.unclip.vector_condition`).

Optimisation as the authors: AdamW (torch defaults, weight decay 0.01), lr 1e-5 after a linear warm-up of
1,000 optimizer steps from 1e-6·lr (sgm's ``LambdaLinearScheduler`` in ``unclip6.yaml``), 10 epochs,
batch 64 (8 per GPU × 2 GPUs × 4 accumulated), 16-mixed, DDP, gradient checkpointing in BIT and UNet.
``trainable="voxel_embed"`` is the transfer variant (§7): only the BIT's voxel table learns, everything
else has ``requires_grad=False`` (so DDP needs no ``find_unused_parameters``); gradients still flow
*through* the frozen UNet into the tokens.

Checkpoints hold ``net.*`` (the BIT) and ``unet.*``; the VAE is held by a
:class:`~brainit_pl.backbones.frozen.FrozenBackbone` and never saved. Reconstruction samples with
``UnCLIPSampler(module.unet, module.vae, ...)`` (or :meth:`Stage2Module.sampler`) conditioned on
:meth:`Stage2Module.semantic_tokens`.

Reproducibility: the training draws (posterior sample, noise, offsets, timesteps) come from a generator
keyed by (seed, epoch, batch, rank), so a resumed run continues exactly; validation uses a key fixed per
batch, so ``val/loss`` is comparable across epochs.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from brainit_pl.backbones.frozen import FrozenBackbone
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import load_module
from brainit_pl.lit.guards import check_finite_loss
from brainit_pl.models.encoder import VoxelRows, check_trainable, grow_voxel_table
from brainit_pl.models.unclip import IMAGE_SIZE, OFFSET_NOISE, UnCLIPSampler, load_unclip, vector_condition

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000


def diffusion_noise(
    shape: tuple[int, ...], offset: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    """sgm's training noise: ε (B, C, H, W) + ``offset`` · ε_BC, one N(0, 1) offset per image and channel."""
    noise = torch.randn(shape, generator=generator, device=device)  # (B, C, H, W)
    return noise + offset * torch.randn(*shape[:2], 1, 1, generator=generator, device=device)  # (B, C, 1, 1)


def ddpm_scheduler() -> Any:
    """The training noise schedule: 1000 DDPM steps, β scaled-linear 0.00085 → 0.012, ε-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


class Stage2Module(L.LightningModule):
    """The semantic BIT and the unCLIP UNet, fine-tuned with the diffusion loss (VAE frozen).

    Args:
        n_voxels: subject → voxel count (linked from the DataModule); must equal the BIT checkpoint's.
        bit_checkpoint: a stage-1 semantic :class:`~brainit_pl.lit.bit.BITModule` checkpoint; its
            hyperparameters rebuild the BIT (its ``clusters`` file must still exist, with the same content).
        unclip: MindEye2's sgm checkpoint (``unclip6_epoch0_step110000.ckpt``); ``None``: the weights folder
            (or, with ``tiny_unclip``, seeded random weights).
        tiny_unclip: use the tiny unCLIP twin (UNet with 32-wide cross-attention = the tiny CLIP twin's).
        trainable: ``"all"`` (BIT + UNet) or ``"voxel_embed"`` (only the BIT's voxel table; transfer, §7).
        lr: AdamW learning rate after the warm-up.
        weight_decay: AdamW weight decay.
        warmup_steps: optimizer steps of linear warm-up (0: none).
        warmup_start: the warm-up's starting fraction of ``lr``.
        offset_noise: weight of the per-image, per-channel offset noise.
        image_size: side of the VAE input (256 → 32² latents).
        source_size: the stored image size read (batch key ``image_<source_size>``; the DataModule's
            ``image_sizes`` must hold it): 256, the store's native copy (the authors'), or 224, resized.
        gradient_checkpointing: recompute the BIT's and the UNet's blocks in the backward pass.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS``).
        seed: seed of the training and validation draws (noise, timesteps, posterior samples).
        voxel_subjects: with ``trainable="voxel_embed"``, only these subjects' rows of the voxel table train
            (a new subject added by ``brainit-pl transfer``); the other rows keep zero gradients and no weight
            decay (:class:`~brainit_pl.models.encoder.VoxelRows`). ``None``: every row.
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        bit_checkpoint: str | None = None,
        unclip: str | None = None,
        tiny_unclip: bool = False,
        trainable: Literal["all", "voxel_embed"] = "all",
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 1000,
        warmup_start: float = 1e-6,
        offset_noise: float = OFFSET_NOISE,
        image_size: int = IMAGE_SIZE,
        source_size: int = 224,
        gradient_checkpointing: bool = True,
        weights_dir: str | None = None,
        seed: int = 0,
        voxel_subjects: list[int] | None = None,
    ) -> None:
        super().__init__()
        check_trainable(trainable, voxel_subjects)
        require(
            warmup_steps >= 0 and 0 < warmup_start <= 1, "need warmup_steps >= 0 and 0 < warmup_start <= 1"
        )
        self.save_hyperparameters()
        self.n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
        self.net = self._load_bit(bit_checkpoint)  # (B, V) betas → (B, 256, D) tokens
        unet, vae = load_unclip(unclip, tiny=tiny_unclip, weights_dir=weights_dir)
        width = unet.config.cross_attention_dim
        require(
            self.token_shape[1] == width,
            f"{bit_checkpoint} predicts {self.token_shape[1]}-wide tokens but the {'tiny ' * tiny_unclip}unCLIP "
            f"UNet's cross-attention reads {width}-wide ones: use a semantic BIT trained on the CLIP the UNet "
            "reads (1664: OpenCLIP ViT-bigG/14 with the real UNet; 32: the tiny CLIP twin with tiny_unclip)",
        )
        self.unet = unet
        # The VAE: frozen, out of state_dict/optimizer. Its input is 2x − 1 = (x − 0.5) / 0.5, so the
        # backbone's mean/std normalisation does it, after the anti-aliased resize to image_size.
        self.frozen_vae = FrozenBackbone(vae, image_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
        self.noise_scheduler = ddpm_scheduler()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if hasattr(self.net, "gradient_checkpointing"):  # whatever stage 1 used
            self.net.gradient_checkpointing = gradient_checkpointing
        self._set_trainable(trainable)
        self.voxel_rows = None if voxel_subjects is None else VoxelRows(self.n_voxels, voxel_subjects)
        # Lightning keeps the modes it finds; the builders return eval-mode networks (the BIT's activation
        # checkpointing only runs in train mode). The FrozenBackbone keeps the VAE in eval mode.
        self.train()

    def _load_bit(self, path: str | None) -> torch.nn.Module:
        """The stage-1 BIT (``.net`` of its BITModule), after checking branch and voxel counts."""
        from brainit_pl.lit.bit import BITModule

        require(
            path is not None,
            "stage 2 starts from a stage-1 semantic BIT: set model.init_args.bit_checkpoint to its .ckpt",
        )
        require(Path(path).is_file(), f"bit_checkpoint {path} does not exist")
        # In a fresh context: LightningCLI instantiates this module inside a context variable that hands
        # *its* hyperparameters to every save_hyperparameters() call, the nested BITModule's included.
        stage1 = contextvars.Context().run(load_module, BITModule, path)
        hp = stage1.hparams
        require(
            hp.branch == "semantic",
            f"{path} is a {hp.branch} BIT; stage 2 fine-tunes the semantic one (CLIP tokens)",
        )
        require(
            stage1.n_voxels == self.n_voxels,
            f"{path} was trained on voxel counts {stage1.n_voxels} but the data has {self.n_voxels}; use the "
            "same store and subjects as stage 1 (the voxel table's rows are the data's global voxel ids)",
        )
        self.token_shape: tuple[int, int] = tuple(stage1.target_shape)  # (T, D)
        log.info("stage 2 starts from the %s BIT of %s (tokens %s)", hp.decoder, path, self.token_shape)
        return stage1.net

    def _set_trainable(self, trainable: str) -> None:
        """``all``: BIT and UNet learn; ``voxel_embed``: only the BIT's voxel table (requires_grad elsewhere off)."""
        everything = trainable == "all"
        self.net.requires_grad_(everything)
        self.unet.requires_grad_(everything)
        if not everything:
            table = getattr(self.net, "voxel_embed", None)
            require(
                isinstance(table, torch.nn.Parameter),
                f"trainable=voxel_embed needs a BIT with a voxel table, not a {type(self.net).__name__}",
            )
            table.requires_grad_(True)

    # ------------------------------------------------------------------------------------------ parts
    @property
    def vae(self) -> AutoencoderKL:
        """The frozen VAE (for :class:`~brainit_pl.models.unclip.UnCLIPSampler`)."""
        return self.frozen_vae.net

    def sampler(self, **kwargs: Any) -> UnCLIPSampler:
        """An :class:`~brainit_pl.models.unclip.UnCLIPSampler` on the fine-tuned UNet and the VAE."""
        return UnCLIPSampler(self.unet, self.vae, image_size=self.hparams.image_size, **kwargs)

    def semantic_tokens(self, betas: Tensor, voxel_ids: Tensor) -> Tensor:
        """(B, V) activations at (B, V) global voxel ids → (B, T, D) adapted-BIT tokens (the UNet's context)."""
        return self.net(betas, voxel_ids)

    def forward(self, betas: Tensor, voxel_ids: Tensor) -> Tensor:
        """Same as :meth:`semantic_tokens`."""
        return self.semantic_tokens(betas, voxel_ids)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) images in [0, 1] → (B, 4, h, w) float32 scaled latents, a posterior sample (as sgm)."""
        with torch.autocast(self.device.type, enabled=False):  # the SDXL VAE overflows in float16
            x = self.frozen_vae.preprocess(images)  # (B, 3, S, S) in [-1, 1]
            posterior = self.vae.encode(x).latent_dist
            return posterior.sample(generator=generator).float() * self.vae.config.scaling_factor

    def diffusion_loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """MSE between the UNet's ε̂ and the noise added to the batch's latents (module docstring).

        Args:
            batch: ``betas``, ``voxel_ids`` (B, V) and ``image_<source_size>`` (B, 3, S, S) in [0, 1].
            generator: on this module's device; draws the posterior sample, noise, offsets and timesteps.

        Returns:
            The scalar float32 loss.
        """
        latents = self.encode(batch[f"image_{self.hparams.source_size}"], generator)  # (B, 4, h, w)
        b = len(latents)
        noise = diffusion_noise(tuple(latents.shape), self.hparams.offset_noise, generator, self.device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=generator, device=self.device)  # (B,)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)  # (B, 4, h, w)
        tokens = self.semantic_tokens(batch["betas"], batch["voxel_ids"])  # (B, T, D)
        added = vector_condition(self.unet, b, device=self.device)
        eps = self.unet(noisy, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        return F.mse_loss(eps.float(), noise)

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(key)

    # ------------------------------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        """Check that the DataModule delivers the ``source_size`` images."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        size = self.hparams.source_size
        if dm is not None and stage in ("fit", "validate", "test"):
            require(
                size in getattr(dm, "image_sizes", ()),
                f"stage 2 encodes the {size}² stimuli with the VAE (model.init_args.source_size): set "
                f"data.image_sizes: [{size}]",
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Keyed by the batch, not the global step: the micro-batches of one accumulated step differ.
        hp = self.hparams
        key = ((hp.seed * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx) * 4099 + self.global_rank
        loss = self.diffusion_loss(batch, self._generator(key))
        check_finite_loss(
            self,
            loss,
            batch,
            batch_idx,
            "stage-2 loss",
            "lower model.init_args.lr, or use bf16-mixed / 32-true precision",
        )
        self.log("train/loss", loss, batch_size=len(batch["betas"]), prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> None:
        key = (self.hparams.seed + 7_919) * 1_000_003 + batch_idx * 4099 + self.global_rank  # fixed draws
        loss = self.diffusion_loss(batch, self._generator(key))
        self.log(f"{stage}/loss", loss, batch_size=len(batch["betas"]), sync_dist=True, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The adapted tokens of a batch: ``tokens`` (B, T, D), ``nsd_id``, ``subject``."""
        return {
            "tokens": self.semantic_tokens(batch["betas"], batch["voxel_ids"]),
            "nsd_id": batch["nsd_id"],
            "subject": batch["subject"],
        }

    # -------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params: list[Any] = [p for p in self.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        log.info("stage 2 trains %s: %d tensors, %s parameters", hp.trainable, len(params), f"{n:,}")
        if self.voxel_rows is not None:  # AdamW's decay would shrink the other rows too: VoxelRows decays
            params = [VoxelRows.param_group(self.net.voxel_embed, hp.weight_decay)]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.warmup_steps == 0:
            return optimizer
        # sgm's LambdaLinearScheduler with f_min = f_max = 1: linear from warmup_start·lr, then constant.
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=hp.warmup_start, end_factor=1.0, total_iters=hp.warmup_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``voxel_subjects``: zero the other rows' gradient, decay the trained rows (VoxelRows)."""
        if self.voxel_rows is not None:
            self.voxel_rows.before_step(self.net.voxel_embed, optimizer)

    # ------------------------------------------------------------------------------------- transfer
    def init_from_stage2(self, checkpoint: str | Path) -> None:
        """Start from a stage-2 checkpoint of fewer subjects: its UNet, its BIT, its subjects' voxel rows.

        A new subject's transfer (docs/method.md §7) continues the base model's stage 2: every weight comes from
        ``checkpoint`` except the voxel rows of the subjects it does not have, which keep what this module
        loaded from ``bit_checkpoint`` (the transferred stage-1 BIT).

        Raises:
            BrainITError: not a stage-2 checkpoint, or a voxel table that is not part of this one.
        """
        from brainit_pl.lit.checkpoints import read_checkpoint

        ckpt = read_checkpoint(checkpoint, "Stage2Module")
        base = {int(s): int(v) for s, v in ckpt["hyper_parameters"]["n_voxels"].items()}
        require(
            all(self.n_voxels.get(s) == v for s, v in base.items()),
            f"{checkpoint} has the voxel table {base} (subject: voxels), which is not part of {self.n_voxels}",
        )
        state = dict(ckpt["state_dict"])
        require("net.voxel_embed" in state, f"{checkpoint} holds no BIT voxel table (net.voxel_embed)")
        fill = self.net.voxel_embed
        state["net.voxel_embed"] = grow_voxel_table(state["net.voxel_embed"], base, self.n_voxels, fill)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise BrainITError(f"{checkpoint} does not fit this stage-2 model ({first})") from err
