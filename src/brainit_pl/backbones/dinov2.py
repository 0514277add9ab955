"""DINOv2 ViT-L/14 with registers: the Universal Brain Encoder's image backbone (docs/method.md §2).

``build_dinov2()`` gives timm's ``vit_large_patch14_reg4_dinov2`` at 224² as a frozen module mapping images
in [0, 1] (ImageNet-normalised inside) to the tokens of the tapped blocks [1, 6, 12, 18, 24] with the 4
register tokens dropped: (B, 5, 257, 1024), CLS first then the 16×16 patches in row-major order, each
block's raw output (no final norm). ``build_dinov2(tiny=True)`` is its twin: the same timm family (patch 14,
4 registers, 257 kept tokens) with width 32 and 5 blocks, all tapped, seeded random weights.

Weights come from timm's Hugging Face file (``model.safetensors``) or Meta's original
``dinov2_vitl14_reg4_pretrain.pth``: timm's own ``checkpoint_filter_fn`` converts the latter and resamples
the 37×37 position embedding of the 518² pre-training to our 16×16 grid, so the same code reads both.

The encoder's trainable low-rank adapters are not part of this frozen module: pass them to
:meth:`DINOv2Tokens.forward`, which adds ``adapters[i](x)`` to the output of block i (x: the block's
input, or its output for adapters that act on it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from brainit_pl.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenBackbone, seeded
from brainit_pl.backbones.weights import (
    load_checked,
    read_state_dict,
    resolve_weights,
)
from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)

IMAGE_SIZE = 224


@dataclass(frozen=True)
class DINOv2Arch:
    """A timm DINOv2 architecture and its default taps.

    Attributes:
        timm_name: the ``timm.create_model`` name.
        layers: default tapped blocks, 1-based (block ``depth`` is the last).
        weights_key: its file in :data:`~brainit_pl.backbones.weights.WEIGHT_FILES` (``None``: no default).
        overrides: keyword arguments that shrink the timm architecture (the tiny twin).
    """

    timm_name: str
    layers: tuple[int, ...]
    weights_key: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, DINOv2Arch] = {
    "dinov2_vitl14_reg": DINOv2Arch(
        "vit_large_patch14_reg4_dinov2", layers=(1, 6, 12, 18, 24), weights_key="dinov2-vitl14-reg"
    ),
}
TINY_ARCH = DINOv2Arch(
    "vit_large_patch14_reg4_dinov2",
    layers=(1, 2, 3, 4, 5),
    overrides={"embed_dim": 32, "depth": 5, "num_heads": 2},
)


class DINOv2Tokens(FrozenBackbone):
    """Frozen DINOv2 returning the tokens of its tapped blocks, registers dropped.

    Attributes:
        name: the architecture (``"tiny"`` for the twin).
        layers: tapped blocks, 1-based.
        width: token width D (1024 for ViT-L).
        n_tokens: tokens T per tapped block (257: CLS + 16×16 patches).
    """

    def __init__(self, net: nn.Module, *, name: str, layers: Sequence[int]) -> None:
        super().__init__(
            net, image_size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_mode="bicubic"
        )
        depth = len(net.blocks)
        layers = tuple(int(i) for i in layers)
        require(
            len(layers) > 0 and all(1 <= i <= depth for i in layers) and list(layers) == sorted(set(layers)),
            f"DINOv2 layers must be increasing block numbers in 1..{depth}, got {layers}",
        )
        self.name = name
        self.layers = layers
        self.width = net.embed_dim
        self.n_registers = net.num_prefix_tokens - 1  # prefix = CLS + registers
        self.n_tokens = 1 + net.patch_embed.num_patches

    def forward(self, images: Tensor, adapters: Sequence[nn.Module] | None = None) -> Tensor:
        """Tokens of the tapped blocks.

        Args:
            images: (B, 3, H, W) in [0, 1]; resized to 224² if needed.
            adapters: optional residual branches, one per block (or per block up to the last tap):
                block i's output becomes ``block_i(x) + adapters[i](x)`` for its input x, or, for an
                adapter with ``on_output = True`` (LoRA on the output), ``y + adapters[i](y)`` with
                y = ``block_i(x)``. The next block and the tap see the adapted output.

        Returns:
            (B, L, T, D): L tapped blocks, T = 257 tokens (CLS, then patches row-major).
        """
        net = self.net
        x = self.preprocess(images)
        # timm's forward_features up to the blocks (``_pos_embed`` prepends CLS and the registers).
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))  # (B, 1 + R + 256, D)
        taps = []
        for i, block in enumerate(net.blocks[: self.layers[-1]]):
            if adapters is None:
                x = block(x)
            elif getattr(adapters[i], "on_output", False):
                x = block(x)
                x = x + adapters[i](x)
            else:
                x = block(x) + adapters[i](x)
            if i + 1 in self.layers:
                taps.append(x)
        tokens = torch.stack(taps, dim=1)  # (B, L, 1 + R + 256, D)
        return torch.cat([tokens[:, :, :1], tokens[:, :, 1 + self.n_registers :]], dim=2)  # (B, L, 257, D)


def build_dinov2(
    name: str = "dinov2_vitl14_reg",
    weights: str | Path | None = None,
    *,
    tiny: bool = False,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    weights_dir: str | Path | None = None,
) -> DINOv2Tokens:
    """Build a frozen DINOv2 returning the tokens of its tapped blocks.

    Args:
        name: the architecture (a key of :data:`ARCHS`).
        weights: a timm ``model.safetensors``/``pytorch_model.bin`` or Meta ``.pth`` file. ``None``: the
            real network reads its file from the weights folder; the tiny twin gets seeded random weights.
        tiny: build the tiny twin instead of ``name``.
        layers: tapped blocks, 1-based; default (1, 6, 12, 18, 24), or (1, 2, 3, 4, 5) for the twin.
        seed: seed of the tiny twin's random weights.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).

    Returns:
        A :class:`DINOv2Tokens`: images in [0, 1] (B, 3, H, W) → (B, L, 257, D).

    Raises:
        BrainITError: an unknown name, a missing file or a file of another architecture.
    """
    if tiny:
        arch, label = TINY_ARCH, "tiny"
    else:
        require(name in ARCHS, f"unknown DINOv2 architecture {name!r}: expected one of {sorted(ARCHS)}")
        arch, label = ARCHS[name], name
    layers = arch.layers if layers is None else layers
    if tiny and weights is None:
        with seeded(seed):
            return DINOv2Tokens(_create(arch), name=label, layers=layers)
    path = resolve_weights(arch.weights_key or "dinov2-vitl14-reg", weights, weights_dir=weights_dir)
    with torch.device("meta"):
        net = _create(arch)
    state = _timm_format(read_state_dict(path), net, path)
    load_checked(net, state, source=path, arch=f"DINOv2 {label} ({arch.timm_name})")
    log.info("loaded DINOv2 %s from %s", label, path)
    return DINOv2Tokens(net, name=label, layers=layers)


def _create(arch: DINOv2Arch) -> nn.Module:
    import timm

    return timm.create_model(
        arch.timm_name, pretrained=False, img_size=IMAGE_SIZE, num_classes=0, **arch.overrides
    )


def _timm_format(state: dict[str, Tensor], net: nn.Module, path: Path) -> dict[str, Tensor]:
    """Meta's key names → timm's, position embedding resampled to 224², by timm's own filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        return checkpoint_filter_fn(state, net)
    except Exception as err:  # the filter assumes a ViT; anything else is the wrong file
        raise BrainITError(
            f"{path} does not hold DINOv2 weights timm can read: {type(err).__name__}: {err}; "
            f"found keys like {list(state)[:4]}"
        ) from err
