"""The reconstruction chain of one batch (docs/method.md §6): low-level BIT → DIP, stage 2 → unCLIP, SDXL refinement.

The method samples the semantic stage with the **stage-2** model: its adapted BIT predicts the tokens and its
fine-tuned UNet reads them (stage ``semantic``). Stage-1 semantic BIT + the *stock* unCLIP UNet is the
paper's "without adapted CLIP" ablation: it runs only when asked for, as its own stage ``semantic_stock``.

Shared by ``brainit-pl reconstruct`` (:mod:`.reconstruct`, models from checkpoints), ``brainit-pl test``
(:class:`~brainit_pl.lit.brainit.BrainITModule`) and the
:class:`~brainit_pl.recon.callback.ReconstructionCallback`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from brainit_pl.devices import inference_autocast
from brainit_pl.errors import require
from brainit_pl.models.v2c import shared_voxel_table

STAGES = ("lowlevel", "semantic", "semantic_stock", "refined")


class Reconstructor:
    """Images of every configured stage from a batch's fMRI.

    Args:
        lowlevel: a low-level ``BITModule`` (its frozen VGG folds the predicted tokens back into maps), or
            ``None`` (the semantic stages then start from noise).
        stage2: a ``Stage2Module`` (adapted BIT + fine-tuned UNet): stage ``semantic``, the method.
        semantic_stock: a stage-1 semantic ``BITModule`` sampled with the stock unCLIP UNet: stage
            ``semantic_stock``, the "without adapted CLIP" ablation.
        unclip: the MindEye2 unclip6 checkpoint (``None``: the weights folder) of the stock UNet.
        tiny_unclip: the stock UNet has the tiny twin's architecture: ``unclip``'s tiny sgm checkpoint (a
            twin pretrained on the stimuli), or random weights without one.
        unclip_size: the stock UNet's image side (``None``: the stage-2 model's, so that both semantic
            stages sample alike; without one, the real model's 256).
        refine: SDXL base (single file or diffusers folder) for the refined stage, or ``None``.
        tiny_refine: use the tiny random SDXL twin (run at 64², not 768²: a CPU budget).
        weights_dir: the weights folder.
        device: where everything runs.
        dip_steps, dip_batch: DIP Adam steps per image and images inverted together.
        dip_lr: the DIP's Adam learning rate (1e-3, the method's, for its 1,800 steps; a CPU preview with far
            fewer steps needs a larger one to converge: benchmarks/RESULTS.md, session 5).
        dip_channels: the DIP network's width (128 in the method; fewer for CPU previews).
        seed: seeds the DIP networks and the diffusion noise.

    Attributes:
        stages: the stages this chain produces, in order (the refinement refines ``semantic`` when there is
            one, else ``semantic_stock``).
        n_voxels: the voxel table (subject → count) the models were trained on.
    """

    def __init__(
        self,
        lowlevel=None,
        stage2=None,
        *,
        semantic_stock=None,
        unclip: Path | None = None,
        tiny_unclip: bool = False,
        unclip_size: int | None = None,
        refine: Path | None = None,
        tiny_refine: bool = False,
        weights_dir: Path | None = None,
        device: torch.device | str = "cpu",
        dip_steps: int = 1800,
        dip_lr: float = 1e-3,
        dip_batch: int = 16,
        dip_channels: int = 128,
        seed: int = 0,
    ) -> None:
        models = {"lowlevel": lowlevel, "stage-2": stage2, "stage-1 semantic": semantic_stock}
        models = {name: m for name, m in models.items() if m is not None}
        require(bool(models), "the chain needs a low-level BIT, a stage-2 model or a stage-1 semantic BIT")
        semantic = stage2 is not None or semantic_stock is not None
        require(semantic or not (refine or tiny_refine), "the refinement needs a semantic stage")
        self.device = torch.device(device)
        self.lowlevel, self.stage2, self.semantic_stock = lowlevel, stage2, semantic_stock
        self.dip_steps, self.dip_batch, self.seed = dip_steps, dip_batch, seed
        self.dip_lr = dip_lr
        self.dip_channels = dip_channels
        self.n_voxels: dict[int, int] = shared_voxel_table(models)
        self.samplers: dict[str, object] = {}
        if stage2 is not None:
            self.samplers["semantic"] = stage2.sampler(progress=False)
        if semantic_stock is not None:
            size = unclip_size or (stage2.hparams.image_size if stage2 is not None else None)
            self.samplers["semantic_stock"] = self._stock_sampler(
                semantic_stock, unclip, tiny_unclip, weights_dir, size
            )
        self.refiner = None
        self.refine_size = 64 if tiny_refine else 768
        if refine or tiny_refine:
            from brainit_pl.recon.refine import build_refiner

            self.refiner = build_refiner(
                refine, tiny=tiny_refine, weights_dir=weights_dir, device=self.device
            )
        on = (lowlevel is not None, stage2 is not None, semantic_stock is not None, self.refiner is not None)
        self.stages = [stage for stage, used in zip(STAGES, on) if used]

    def _stock_sampler(self, semantic, unclip, tiny_unclip: bool, weights_dir, image_size: int | None):
        from brainit_pl.models.unclip import IMAGE_SIZE, UnCLIPSampler, load_unclip

        unet, vae = load_unclip(unclip, tiny=tiny_unclip, weights_dir=weights_dir)
        width = semantic.target_shape[1]
        require(
            unet.config.cross_attention_dim == width,
            f"the semantic BIT predicts {width}-wide CLIP tokens but the unCLIP UNet reads "
            f"{unet.config.cross_attention_dim}-wide ones (tiny twins pair with tiny twins)",
        )
        return UnCLIPSampler(
            unet.to(self.device).eval(),
            vae.to(self.device).eval(),
            image_size=image_size or IMAGE_SIZE,
            progress=False,
        )

    @classmethod
    def from_checkpoints(
        cls,
        lowlevel: Path | None,
        stage2: Path | None = None,
        *,
        semantic_stock: Path | None = None,
        **kwargs,
    ) -> Reconstructor:
        """The chain of ``brainit-pl fit`` checkpoints (any may be ``None``; one is needed)."""
        from brainit_pl.lit.loading import load_bit, load_stage2  # Lightning is heavy: imported when used

        device = torch.device(kwargs.get("device", "cpu"))
        low = load_bit(lowlevel, "lowlevel", device) if lowlevel else None
        s2 = load_stage2(stage2, device) if stage2 else None
        stock = load_bit(semantic_stock, "semantic", device) if semantic_stock else None
        return cls(low, s2, semantic_stock=stock, **kwargs)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """stage → (B, 3, H, W) float images in [0, 1] (DIP 224², unCLIP 256², refined 224²).

        Both semantic stages start from the same diffusion noise (one generator per stage, same seed), so
        their difference is the models' alone.
        """
        dev = self.device
        betas, ids = batch["betas"].to(dev), batch["voxel_ids"].to(dev)
        images: dict[str, Tensor] = {}
        init = None
        if self.lowlevel is not None:
            from brainit_pl.recon.dip import SkipConfig, invert_vgg_tokens

            tokens = self._predict(self.lowlevel, betas, ids)  # (B, 7190, width)
            # The DIP optimises its own networks: gradients on, also inside Lightning's inference mode
            # (validation/test hooks), with the targets cloned out of it (inference tensors can't be saved
            # for backward).
            with torch.inference_mode(False), torch.enable_grad():
                init = invert_vgg_tokens(
                    tokens.clone(),
                    self.lowlevel.vgg_tokens,
                    steps=self.dip_steps,
                    lr=self.dip_lr,
                    batch=self.dip_batch,
                    seed=self.seed,
                    net=SkipConfig(channels=self.dip_channels),
                    progress=False,
                )
            images["lowlevel"] = init
        for stage, model in (("semantic", self.stage2), ("semantic_stock", self.semantic_stock)):
            if model is None:
                continue
            clip = self._predict(model, betas, ids)  # (B, 256, width)
            images[stage] = self.samplers[stage](clip, init_images=init, generator=self._generator(batch))
        if self.refiner is not None:
            from brainit_pl.recon.refine import refine

            source = images["semantic"] if "semantic" in images else images["semantic_stock"]
            gen = self._generator(batch)
            images["refined"] = refine(
                self.refiner, source, size=self.refine_size, generator=gen, progress=False
            )
        return images

    def _predict(self, model: torch.nn.Module, betas: Tensor, ids: Tensor) -> Tensor:
        """A model's float32 features in eval mode (its own mode restored: it may be the one being trained)."""
        was_training = model.training
        model.eval()
        with inference_autocast(self.device):
            out = model(betas, ids).float()
        model.train(was_training)
        return out

    def _generator(self, batch: dict[str, Tensor]) -> torch.Generator:
        """The diffusion noise of a batch: keyed by the seed and the batch's first image, not by the order."""
        return torch.Generator(self.device).manual_seed(self.seed * 100_003 + int(batch["nsd_id"][0]))
