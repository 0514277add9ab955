"""MindEye2's unCLIP checkpoint: Stability ``sgm`` key layout ↔ diffusers.

``unclip6_epoch0_step110000.ckpt`` is an ``sgm`` ``DiffusionEngine`` state dict (a torch pickle holding
``state_dict``): the UNet under ``model.diffusion_model.*`` in the original SDXL/ldm layout, the SDXL VAE
under ``first_stage_model.*`` (the frozen OpenCLIP embedder under ``conditioner.*`` is not read).

Reading uses diffusers' own single-file converters, :func:`convert_ldm_unet_checkpoint` and
:func:`convert_ldm_vae_checkpoint`, driven by *our* configs rather than the configs diffusers would infer:
diffusers infers SDXL's ``addition_embed_type="text_time"`` only for context widths 2048/1280 and would
take this 1664-wide unCLIP for a ``class_embed_type="projection"`` model. Both embed the 1024-d vector
condition through an MLP of the same shapes, but only ``text_time`` feeds it the sinusoidal embedding of
(original size, crop) as sgm's ``ConcatTimestepEmbedderND`` does; given our config, the converter maps
sgm's ``label_emb.0.{0,2}`` onto ``add_embedding.linear_{1,2}``, so those keys need no extra care.

Writing (:func:`diffusers_to_sgm`, :func:`save_sgm_checkpoint`) is the inverse, written out here from the
layout rules (diffusers ships no diffusers→ldm converter for these models). It exists so that tiny twins
can be saved as a file of the real format and read back through the real loading code; the tests check
that diffusers' reader inverts it exactly.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from brainit_pl.backbones.weights import read_state_dict
from brainit_pl.errors import BrainITError, require

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET_UNET = (  # diffusers → ldm names inside a UNet ResBlock
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_RESNET_VAE = (("conv_shortcut.", "nin_shortcut."),)
_ATTN_VAE = (  # diffusers → ldm names inside the VAE's mid-block attention
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def read_sgm_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The UNet and VAE tensors of an sgm checkpoint, under their sgm names (prefixes kept).

    Raises:
        BrainITError: the file is unreadable, holds Python objects that a safe load refuses, or has no
            ``model.diffusion_model.*`` / ``first_stage_model.*`` tensors (the message shows what it has).
    """
    path = Path(path)
    _refuse_unsafe_pickle(path)
    state = read_state_dict(path)
    for prefix, part in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        require(
            any(k.startswith(prefix) for k in state),
            f"{path} is not an sgm DiffusionEngine checkpoint: no {prefix}* keys (its {part}); found "
            f"{len(state)} tensors with prefixes {_prefixes(state)}, e.g. {list(state)[:3]}",
        )
    return {k: v for k, v in state.items() if k.startswith((UNET_PREFIX, VAE_PREFIX))}


def sgm_to_diffusers(
    state: Mapping[str, Tensor], unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], *, source: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """sgm tensors → (UNet, VAE) state dicts in diffusers layout, by diffusers' single-file converters.

    Args:
        state: tensors under ``model.diffusion_model.*`` and ``first_stage_model.*``.
        unet_config: the ``UNet2DConditionModel`` config the tensors are meant for.
        vae_config: the ``AutoencoderKL`` config.
        source: the file, for messages.

    Raises:
        BrainITError: a tensor the converters need is missing (the file is of another architecture).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_part = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vae_part = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    try:
        unet = convert_ldm_unet_checkpoint(unet_part, dict(unet_config))
        vae = convert_ldm_vae_checkpoint(vae_part, dict(vae_config))
    except KeyError as err:  # the converters index the keys a config implies; absent = another model
        raise BrainITError(
            f"{source} does not hold an SDXL-unCLIP UNet and VAE: tensor {err} is missing"
        ) from err
    return unet, vae  # keys and shapes are checked against the architecture by load_checked


def diffusers_to_sgm(unet: nn.Module, vae: nn.Module) -> dict[str, Tensor]:
    """The sgm state dict (``model.diffusion_model.*``, ``first_stage_model.*``) of a diffusers UNet and VAE.

    Raises:
        ValueError: a key has no sgm name (a UNet/VAE layout this inverse does not cover).
    """
    out = {UNET_PREFIX + k: v for k, v in _rename(unet.state_dict(), _unet_prefixes(unet.config)).items()}
    vae_state = _rename(vae.state_dict(), _vae_prefixes(vae.config))
    for key, value in vae_state.items():
        # ldm's VAE attention projections are 1×1 convolutions; diffusers' are linear layers
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]
        out[VAE_PREFIX + key] = value
    return out


def save_sgm_checkpoint(path: str | os.PathLike, unet: nn.Module, vae: nn.Module) -> Path:
    """Write ``unet`` and ``vae`` as an sgm checkpoint (``{"state_dict": ...}``), as MindEye2's file is."""
    path = Path(path)
    state = {k: v.detach().clone().contiguous() for k, v in diffusers_to_sgm(unet, vae).items()}
    torch.save({"state_dict": state}, path)
    return path


def _refuse_unsafe_pickle(path: Path) -> None:
    """A one-line error for a full training checkpoint whose pickle holds objects besides tensors.

    Checkpoints are read with ``weights_only=True`` (no file may run code); torch would refuse such a file
    with a long message, so the globals are listed first and a way to strip the file is given.
    """
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return  # missing or legacy-format files: read_state_dict reports them
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a TorchScript or damaged archive: left to read_state_dict's own message
        return
    require(
        not unsafe,
        f"{path} holds Python objects besides tensors ({', '.join(sorted(unsafe)[:5])}), which brainit-pl "
        'does not unpickle; if you trust the file, keep only its tensors once with: python -c "import torch; '
        f"p='{path}'; torch.save({{'state_dict': torch.load(p, weights_only=False)['state_dict']}}, p)\"",
    )


def _prefixes(state: Mapping[str, Tensor]) -> list[str]:
    return sorted({".".join(k.split(".")[:2]) + "." for k in state})[:8]


def _rename(state: Mapping[str, Tensor], prefixes: list[tuple[str, str, tuple]]) -> dict[str, Tensor]:
    """Rename diffusers keys by the first matching (diffusers prefix, ldm prefix, inner renames) rule."""
    out = {}
    for key, value in state.items():
        for new_prefix, old_prefix, inner in prefixes:
            if key.startswith(new_prefix):
                rest = key[len(new_prefix) :]
                for new, old in inner:
                    rest = old + rest[len(new) :] if rest.startswith(new) else rest
                out[old_prefix + rest] = value
                break
        else:
            raise ValueError(f"no sgm name for diffusers key {key!r}")
    return out


def _unet_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, tuple]]:
    """The SDXL/ldm UNet layout: input_blocks = conv_in, then per level L (resnet, attention) pairs and a
    downsampler; output_blocks = per level L + 1 (resnet, attention) pairs, the upsampler after the last."""
    per = config["layers_per_block"]
    rules: list[tuple[str, str, tuple]] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()),
        ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("add_embedding.linear_1.", "label_emb.0.0.", ()),
        ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()),
        ("conv_norm_out.", "out.0.", ()),
        ("conv_out.", "out.2.", ()),
        ("mid_block.attentions.0.", "middle_block.1.", ()),
    ]
    rules += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", _RESNET_UNET) for j in range(2)]
    for i, up_type in enumerate(config["up_block_types"]):
        for j in range(per):
            block = (per + 1) * i + j + 1
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", _RESNET_UNET))
            rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", ()))
        rules.append(
            (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op.", ())
        )
        for j in range(per + 1):
            block = (per + 1) * i + j
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", _RESNET_UNET))
            rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", ()))
        slot = 2 if "CrossAttn" in up_type else 1  # the upsampler follows the resnet (and its attention)
        rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{slot}.", ()))
    return rules


def _vae_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, tuple]]:
    """The ldm VAE layout: ``down.i.block.j`` / ``up.i.block.j`` with ldm's up levels numbered bottom-up."""
    levels = len(config["block_out_channels"])
    rules: list[tuple[str, str, tuple]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", ()),
        ("decoder.conv_norm_out.", "decoder.norm_out.", ()),
    ]
    for part in ("encoder", "decoder"):
        rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _ATTN_VAE))
        rules += [
            (f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", _RESNET_VAE) for j in range(2)
        ]
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", ()),
            (f"{part}.conv_out.", f"{part}.conv_out.", ()),
        ]
    per = config["layers_per_block"]
    for i in range(levels):
        up = levels - 1 - i
        for j in range(per):
            rules.append(
                (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _RESNET_VAE)
            )
        for j in range(per + 1):  # the decoder has one resnet more per level
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _RESNET_VAE))
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()))
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", ()))
    rules += [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    return rules
