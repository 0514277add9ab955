"""Factories for the frozen pretrained networks (and their tiny twins) that brainit-pl uses but never trains.

Each ``build_<thing>`` returns a frozen, eval-mode module whose weights come from local files only; every
network has a tiny twin (random, seeded, instant on CPU) built by the same factory and loaded through the
same code. None of them ever lands in a checkpoint.

* :func:`build_clip` (:mod:`.clip`): OpenCLIP ViT-bigG-14 patch tokens, the semantic targets.
* :func:`build_vgg` (:mod:`.vgg`): VGG16-BN feature maps; :class:`VGGTokens`, :func:`vgg_maps_to_tokens`
  and :func:`vgg_tokens_to_maps` turn them into the low-level tokens and back.
* :func:`build_dinov2` (:mod:`.dinov2`): DINOv2 ViT-L/14 (registers) tokens, the Universal Encoder's backbone.
* :mod:`.weights`: the weights folder (:func:`weights_folder`, ``$BRAINIT_WEIGHTS``), the file registry
  (:data:`WEIGHT_FILES`), :func:`resolve_weights`, :func:`read_state_dict` and strict :func:`load_checked`,
  shared by all of the above; :mod:`.frozen`: :class:`FrozenBackbone`, the frozen wrapper.

The feature networks of the image metrics are part of the metrics (:mod:`brainit_pl.metrics.nets`), not here.

The names below are imported on first use (PEP 562 ``__getattr__``), so importing one backbone module
(``brainit_pl.backbones.vgg``) does not load the others.

Layer: imports only ``errors``/``files`` below it (see :mod:`brainit_pl.layers`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# the public names of each submodule (``__all__`` lists the same names, for star imports and linters)
_SUBMODULE_EXPORTS: dict[str, tuple[str, ...]] = {
    "clip": ("CLIPTokens", "build_clip"),
    "vgg": (
        "VGG_TOKEN_RULES",
        "TokenRule",
        "VGGFeatures",
        "VGGTokenLayout",
        "VGGTokens",
        "build_vgg",
        "vgg_maps_to_tokens",
        "vgg_token_layout",
        "vgg_tokens_to_maps",
    ),
    "dinov2": ("DINOv2Tokens", "build_dinov2"),
    "frozen": ("IMAGENET_MEAN", "IMAGENET_STD", "FrozenBackbone", "seeded"),
    "weights": (
        "DEFAULT_WEIGHTS_DIR",
        "WEIGHTS_ENV",
        "WEIGHT_FILES",
        "WeightFile",
        "find_weights",
        "load_checked",
        "read_state_dict",
        "resolve_weights",
        "weights_folder",
    ),
}
_EXPORTS: dict[str, str] = {name: module for module, names in _SUBMODULE_EXPORTS.items() for name in names}

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG_TOKEN_RULES",
    "WEIGHTS_ENV",
    "WEIGHT_FILES",
    "CLIPTokens",
    "DINOv2Tokens",
    "FrozenBackbone",
    "TokenRule",
    "VGGFeatures",
    "VGGTokenLayout",
    "VGGTokens",
    "WeightFile",
    "build_clip",
    "build_dinov2",
    "build_vgg",
    "find_weights",
    "load_checked",
    "read_state_dict",
    "resolve_weights",
    "seeded",
    "vgg_maps_to_tokens",
    "vgg_token_layout",
    "vgg_tokens_to_maps",
    "weights_folder",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access, and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from brainit_pl.backbones.clip import CLIPTokens, build_clip
    from brainit_pl.backbones.dinov2 import DINOv2Tokens, build_dinov2
    from brainit_pl.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenBackbone, seeded
    from brainit_pl.backbones.vgg import (
        VGG_TOKEN_RULES,
        TokenRule,
        VGGFeatures,
        VGGTokenLayout,
        VGGTokens,
        build_vgg,
        vgg_maps_to_tokens,
        vgg_token_layout,
        vgg_tokens_to_maps,
    )
    from brainit_pl.backbones.weights import (
        DEFAULT_WEIGHTS_DIR,
        WEIGHT_FILES,
        WEIGHTS_ENV,
        WeightFile,
        find_weights,
        load_checked,
        read_state_dict,
        resolve_weights,
        weights_folder,
    )
