"""OpenCLIP ViT patch tokens: the semantic targets and unCLIP conditioning (docs/method.md §5).

``build_clip()`` gives the vision tower of OpenCLIP ViT-bigG-14 (laion2b_s39b_b160k) as a frozen module
mapping images in [0, 1] to the 256 patch tokens × 1664 of its last layer (after ``ln_post``, before the
projection; the CLS token dropped), as MindEye2's ``FrozenOpenCLIPImageEmbedder(output_tokens=True)``
does. ``build_clip(tiny=True)`` is its twin: an OpenCLIP ViT with the same patch 14 at 224² (so the same
256 tokens), tiny width and depth, seeded random weights.

Architectures are OpenCLIP's config dicts (a built-in name, the ``open_clip_config.json`` of a
``local-dir:`` folder, or :data:`TINY_CONFIG`); weights come from an OpenCLIP checkpoint, of which only
the ``visual.*`` tensors are read. We build ``open_clip.CLIP`` on the meta device and keep its
``visual`` rather than calling ``open_clip.create_model``: that would randomly initialise and keep the
whole 2.5B-parameter model (text tower included) in memory before loading, and report a wrong file as
a RuntimeError listing hundreds of keys.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from brainit_pl.backbones.frozen import FrozenBackbone, seeded
from brainit_pl.backbones.weights import (
    WEIGHT_FILES,
    load_checked,
    read_state_dict,
    resolve_weights,
    weights_folder,
)
from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)

DEFAULT_NAME = "ViT-bigG-14"
WEIGHTS_KEY = "clip-vit-bigg-14"  # DEFAULT_NAME's file in WEIGHT_FILES
LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
# Checkpoint names looked for in a local-dir folder, in OpenCLIP's order of preference.
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)

# An OpenCLIP model config, like open_clip/model_configs/*.json: patch 14 at 224² gives 16×16 = 256 tokens.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "patch_size": 14, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}

# The vision tower is all we keep, so the text tower built alongside it on the meta device is the
# smallest valid one (an HF text tower in a config would otherwise try to reach the hub).
_STUB_TEXT_CFG = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


class CLIPTokens(FrozenBackbone):
    """Frozen OpenCLIP ViT vision tower returning its patch tokens.

    Attributes:
        name: the architecture (``"tiny"`` for the twin).
        width: token width D (1664 for ViT-bigG-14).
        n_tokens: patch tokens T per image (256 at 224² with patch 14).
    """

    def __init__(
        self, visual: nn.Module, *, name: str, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        super().__init__(visual, image_size=visual.image_size[0], mean=mean, std=std, resize_mode="bicubic")
        self.name = name
        self.width = visual.transformer.width
        self.n_tokens = visual.grid_size[0] * visual.grid_size[1]

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) → the network's input (B, 3, 224, 224).

        Resize, then x ← (x + 1) / 2, then CLIP mean/std: the (x + 1) / 2 reproduces MindEye2's embedder,
        which expects images in [-1, 1] but is fed [0, 1]; the unCLIP model was trained on tokens made
        this way, so the targets must be too.
        """
        return self.normalize((self.resize(self.check(images)) + 1.0) / 2.0)

    def forward(self, images: Tensor) -> Tensor:
        """Patch tokens of a batch of images.

        Args:
            images: (B, 3, H, W) in [0, 1]; resized to 224² if needed.

        Returns:
            (B, T, D) patch tokens (T = 256), CLS dropped.
        """
        _, tokens = self.net(self.preprocess(images))
        return tokens


def build_clip(
    name: str = DEFAULT_NAME,
    pretrained: str | Path | None = None,
    *,
    tiny: bool = False,
    seed: int = 0,
    weights_dir: str | Path | None = None,
) -> CLIPTokens:
    """Build a frozen OpenCLIP vision tower returning patch tokens.

    Args:
        name: an OpenCLIP built-in architecture (``open_clip.list_models()``).
        pretrained: an OpenCLIP checkpoint file, or a folder (optionally written ``local-dir:<folder>``)
            holding ``open_clip_config.json`` and a checkpoint, as on the Hugging Face hub. ``None``:
            ``ViT-bigG-14`` reads the laion2b_s39b_b160k checkpoint from its folder in the weights folder
            (any of :data:`CHECKPOINT_NAMES`); the tiny twin gets seeded random weights.
        tiny: build the tiny twin (:data:`TINY_CONFIG`) instead of ``name``.
        seed: seed of the tiny twin's random weights.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).

    Returns:
        A :class:`CLIPTokens`: images in [0, 1] (B, 3, H, W) → tokens (B, 256, D).

    Raises:
        BrainITError: a missing file, an unknown architecture, or a file of another architecture.
    """
    arch = "tiny" if tiny else name
    if tiny and pretrained is None:
        with seeded(seed):
            visual = _vision_tower(TINY_CONFIG)
        return _wrap(visual, arch, {})
    if pretrained is None:
        require(
            name == DEFAULT_NAME,
            f"no default weights for OpenCLIP {name!r}: pass the checkpoint with pretrained=...",
        )
        # The default folder may hold any of OpenCLIP's checkpoint names (the hub has .bin and .safetensors).
        folder = weights_folder(weights_dir) / Path(WEIGHT_FILES[WEIGHTS_KEY].path).parent
        has_checkpoint = any((folder / n).is_file() for n in CHECKPOINT_NAMES)
        pretrained = folder if has_checkpoint else resolve_weights(WEIGHTS_KEY, weights_dir=weights_dir)
    config, checkpoint, preprocess = _locate(arch, pretrained)
    with torch.device("meta"):
        visual = _vision_tower(config)
    state = read_state_dict(checkpoint, prefix="visual.")
    load_checked(visual, state, source=checkpoint, arch=f"OpenCLIP {arch} vision tower")
    log.info("loaded OpenCLIP %s vision tower from %s", arch, checkpoint)
    return _wrap(visual, arch, preprocess)


def _locate(arch: str, pretrained: str | Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """(model config, checkpoint file, preprocess config) for a checkpoint file or local-dir folder."""
    text = str(pretrained)
    path = Path(text[len(LOCAL_DIR) :] if text.startswith(LOCAL_DIR) else text).expanduser()
    require(path.exists(), f"OpenCLIP weights not found: {path} (a checkpoint file or a local-dir: folder)")
    if path.is_file():
        return _builtin_config(arch), path, {}
    if (path / CONFIG_FILE).is_file():  # the folder's own config wins, as in open_clip's local-dir:
        saved = json.loads((path / CONFIG_FILE).read_text())
        config, preprocess = saved.get("model_cfg", saved), saved.get("preprocess_cfg", {})
    else:
        config, preprocess = _builtin_config(arch), {}
    checkpoints = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()]
    require(
        bool(checkpoints), f"no OpenCLIP checkpoint in {path}: expected one of {', '.join(CHECKPOINT_NAMES)}"
    )
    return config, checkpoints[0], preprocess


def _builtin_config(arch: str) -> dict[str, Any]:
    if arch == "tiny":
        return copy.deepcopy(TINY_CONFIG)
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise BrainITError(
            f"unknown OpenCLIP architecture {arch!r}: expected a name from open_clip.list_models()"
        )
    return config


def _vision_tower(config: dict[str, Any]) -> nn.Module:
    """The ``visual`` of ``open_clip.CLIP(**config)``, set to return its tokens."""
    import open_clip

    config = copy.deepcopy(config)
    vision = config["vision_cfg"]
    require(
        "timm_model_name" not in vision and isinstance(vision.get("layers"), int),
        f"OpenCLIP config is not a plain ViT (vision_cfg {vision}); patch tokens need a ViT",
    )
    vision["output_tokens"] = True
    config["text_cfg"] = _STUB_TEXT_CFG
    config.pop("custom_text", None)
    return open_clip.CLIP(**config).visual


def _wrap(visual: nn.Module, arch: str, preprocess: dict[str, Any]) -> CLIPTokens:
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = tuple(preprocess.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", OPENAI_DATASET_STD))
    return CLIPTokens(visual, name=arch, mean=mean, std=std)
