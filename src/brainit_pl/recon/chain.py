"""The reconstruction chain of one batch: low-level BIT → DIP, semantic BIT → unCLIP, SDXL refinement.

Shared by ``brainit-pl reconstruct`` (:mod:`.reconstruct`, models from checkpoints) and the
:class:`~brainit_pl.recon.callback.ReconstructionCallback` (the module being trained is one of the BITs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from brainit_pl.devices import inference_autocast
from brainit_pl.errors import require

STAGES = ("lowlevel", "semantic", "refined")


class Reconstructor:
    """Images of every configured stage from a batch's fMRI.

    Args:
        lowlevel: a low-level ``BITModule`` (its frozen VGG folds the predicted tokens back into maps), or
            ``None`` (the semantic stage then starts from noise).
        semantic: a semantic ``BITModule``, or ``None``.
        unclip: the MindEye2 unclip6 checkpoint (``None``: the weights folder) for the semantic stage.
        tiny_unclip: use the tiny random unCLIP twin.
        refine: SDXL base (single file or diffusers folder) for the refined stage, or ``None``.
        tiny_refine: use the tiny random SDXL twin (run at 64², not 768²: a CPU budget).
        weights_dir: the weights folder.
        device: where everything runs.
        dip_steps, dip_batch: DIP Adam steps per image and images inverted together.
        dip_channels: the DIP network's width (128 in the method; fewer for CPU previews).
        seed: seeds the DIP networks and the diffusion noise.

    Attributes:
        stages: the stages this chain produces, in order.
        n_voxels: the voxel table (subject → count) the BITs were trained on.
    """

    def __init__(
        self,
        lowlevel=None,
        semantic=None,
        *,
        unclip: Path | None = None,
        tiny_unclip: bool = False,
        refine: Path | None = None,
        tiny_refine: bool = False,
        weights_dir: Path | None = None,
        device: torch.device | str = "cpu",
        dip_steps: int = 1800,
        dip_batch: int = 16,
        dip_channels: int = 128,
        seed: int = 0,
    ) -> None:
        require(lowlevel is not None or semantic is not None, "the chain needs a low-level or a semantic BIT")
        require(
            semantic is not None or not (refine or tiny_refine), "the refinement needs the semantic stage"
        )
        self.device = torch.device(device)
        self.lowlevel, self.semantic = lowlevel, semantic
        self.dip_steps, self.dip_batch, self.seed = dip_steps, dip_batch, seed
        self.dip_channels = dip_channels
        tables = {name: m.n_voxels for name, m in (("lowlevel", lowlevel), ("semantic", semantic)) if m}
        require(
            len({json.dumps(sorted(t.items())) for t in tables.values()}) == 1,
            f"the BITs were trained on different voxel tables: {tables}",
        )
        self.n_voxels: dict[int, int] = next(iter(tables.values()))
        self.sampler = self.refiner = None
        self.refine_size = 64 if tiny_refine else 768
        if semantic is not None:
            from brainit_pl.models.unclip import UnCLIPSampler, load_unclip

            unet, vae = load_unclip(unclip, tiny=tiny_unclip, weights_dir=weights_dir)
            width = semantic.target_shape[1]
            require(
                unet.config.cross_attention_dim == width,
                f"the semantic BIT predicts {width}-wide CLIP tokens but the unCLIP UNet reads "
                f"{unet.config.cross_attention_dim}-wide ones (tiny twins pair with tiny twins)",
            )
            self.sampler = UnCLIPSampler(
                unet.to(self.device).eval(), vae.to(self.device).eval(), progress=False
            )
        if refine or tiny_refine:
            from brainit_pl.recon.refine import build_refiner

            self.refiner = build_refiner(
                refine, tiny=tiny_refine, weights_dir=weights_dir, device=self.device
            )
        on = (lowlevel is not None, semantic is not None, self.refiner is not None)
        self.stages = [stage for stage, used in zip(STAGES, on) if used]

    @classmethod
    def from_checkpoints(cls, lowlevel: Path | None, semantic: Path | None, **kwargs) -> Reconstructor:
        """The chain of two ``brainit-pl fit`` checkpoints (either may be ``None``)."""
        from brainit_pl.lit.loading import load_bit  # Lightning is heavy: imported when used

        device = torch.device(kwargs.get("device", "cpu"))
        low = load_bit(lowlevel, "lowlevel", device) if lowlevel else None
        sem = load_bit(semantic, "semantic", device) if semantic else None
        return cls(low, sem, **kwargs)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """stage → (B, 3, H, W) float images in [0, 1] (DIP 224², unCLIP 256², refined 224²)."""
        dev = self.device
        betas, ids = batch["betas"].to(dev), batch["voxel_ids"].to(dev)
        gen = torch.Generator(dev).manual_seed(self.seed * 100_003 + int(batch["nsd_id"][0]))
        images: dict[str, Tensor] = {}
        init = None
        if self.lowlevel is not None:
            from brainit_pl.recon.dip import SkipConfig, invert_vgg_tokens

            was_training = self.lowlevel.training
            self.lowlevel.eval()
            with inference_autocast(dev):
                tokens = self.lowlevel(betas, ids).float()  # (B, 7190, width)
            self.lowlevel.train(was_training)
            # The DIP optimises its own networks: gradients on, also inside Lightning's inference mode
            # (validation/test hooks), with the targets cloned out of it (inference tensors can't be saved
            # for backward).
            with torch.inference_mode(False), torch.enable_grad():
                init = invert_vgg_tokens(
                    tokens.clone(),
                    self.lowlevel.vgg_tokens,
                    steps=self.dip_steps,
                    batch=self.dip_batch,
                    seed=self.seed,
                    net=SkipConfig(channels=self.dip_channels),
                    progress=False,
                )
            images["lowlevel"] = init
        if self.semantic is not None:
            was_training = self.semantic.training
            self.semantic.eval()
            with inference_autocast(dev):
                clip = self.semantic(betas, ids).float()  # (B, 256, width)
            self.semantic.train(was_training)
            images["semantic"] = self.sampler(clip, init_images=init, generator=gen)
        if self.refiner is not None:
            from brainit_pl.recon.refine import refine

            images["refined"] = refine(
                self.refiner, images["semantic"], size=self.refine_size, generator=gen, progress=False
            )
        return images
