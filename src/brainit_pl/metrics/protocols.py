"""The two evaluation protocols: how every image is resized before a metric sees it.

Published NSD tables come from two evaluators that differ only in image preprocessing, so a protocol here is
exactly that: two functions, one for the pixel metrics (PixCorr, SSIM at 425²) and one for the network
inputs. The metric definitions themselves are shared. Never mix protocols in one table.

``mindeye2`` (default; MindEye2's ``final_evaluations`` notebook):
    every image is first resized to 256² with torchvision's ``Resize((256, 256))`` on float tensors, i.e.
    bilinear with ``antialias=True`` (the torchvision default since 0.17; we set it explicitly). From 256²,
    the pixel metrics resize to 425² and each network to its own input size (AlexNet 256², Inception 342²,
    CLIP 224², EfficientNet 255², SwAV 224²), bilinear, antialias on, in float32 torch.

``braindiffuser`` (Brain-Diffuser's ``eval_extract_features.py`` / ``evaluate_reconstruction.py``):
    images are 8-bit PNGs handled by PIL. Pixel metrics: the image is resized to 425² with PIL's default
    ``Image.resize`` filter (bicubic; a 425² NSD ground truth is left untouched) and divided by 255.
    Networks: ``torchvision.transforms.functional.resize(pil_image, (224, 224))`` (PIL bilinear, which
    antialiases), ``to_tensor``, then the network's normalisation — every network at 224², whatever its
    MindEye2 size. Float inputs are rounded to 8 bits first, which is exact for images read from PNGs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from brainit_pl.errors import BrainITError

PROTOCOLS: tuple[str, ...] = ("mindeye2", "braindiffuser")
DEFAULT_PROTOCOL = "mindeye2"

COMMON_SIZE = 256  # MindEye2: every recon and ground truth is first brought to 256²
PIXEL_SIZE = 425  # PixCorr and SSIM are computed at the NSD stimulus size
BRAINDIFFUSER_NET_SIZE = 224  # Brain-Diffuser feeds every network 224² images
# torchvision's tensor Resize antialiases by default since 0.17; MindEye2 relies on that default.
ANTIALIAS = True


def resize_bilinear(images: Tensor, size: int) -> Tensor:
    """Resize like torchvision ``Resize((size, size))`` on float tensors (bilinear, antialias on).

    Args:
        images: (B, C, H, W) float.
        size: output side.

    Returns:
        (B, C, size, size), same dtype; the input itself when it is already that size (as torchvision does).
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=ANTIALIAS)


def resize_pil(images: Tensor, size: int, resample: str) -> Tensor:
    """Resize each image with PIL in 8 bits, as Brain-Diffuser's scripts do.

    Args:
        images: (B, 3, H, W) float in [0, 1]; rounded to uint8 first.
        size: output side.
        resample: ``"bilinear"`` or ``"bicubic"`` (PIL filters; both antialias when shrinking).

    Returns:
        (B, 3, size, size) float32 in [0, 1] (multiples of 1/255), on the input's device.
    """
    from PIL import Image

    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    as_uint8 = (images.detach().float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
    out = []
    for image in as_uint8.permute(0, 2, 3, 1).numpy():  # (H, W, 3) uint8 each
        pil = Image.fromarray(image, mode="RGB")
        if pil.size != (size, size):
            pil = pil.resize((size, size), resample=filters[resample])
        out.append(np.asarray(pil))
    stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (B, 3, size, size) uint8
    return (stacked.float() / 255.0).to(images.device)


class Protocol:
    """Image preprocessing of one published evaluator (see the module docstring).

    Attributes:
        name: ``"mindeye2"`` or ``"braindiffuser"``.
    """

    name: str = ""

    def pixel_input(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1] → (B, 3, 425, 425) float32, what PixCorr and SSIM compare."""
        raise NotImplementedError

    def net_input(self, images: Tensor, size: int) -> Tensor:
        """(B, 3, H, W) float in [0, 1] → (B, 3, S, S) float32 network input before normalisation.

        ``size`` is the network's MindEye2 input side; Brain-Diffuser ignores it (always 224²).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Protocol({self.name!r})"


class MindEye2Protocol(Protocol):
    """MindEye2: 256² first, then bilinear (antialiased) torch resizes; runs on any device."""

    name = "mindeye2"

    def pixel_input(self, images: Tensor) -> Tensor:
        return resize_bilinear(resize_bilinear(images.float(), COMMON_SIZE), PIXEL_SIZE)

    def net_input(self, images: Tensor, size: int) -> Tensor:
        return resize_bilinear(resize_bilinear(images.float(), COMMON_SIZE), size)


class BrainDiffuserProtocol(Protocol):
    """Brain-Diffuser: PIL resizes of 8-bit images straight from the originals (CPU)."""

    name = "braindiffuser"

    def pixel_input(self, images: Tensor) -> Tensor:
        return resize_pil(images, PIXEL_SIZE, "bicubic")

    def net_input(self, images: Tensor, size: int) -> Tensor:
        return resize_pil(images, BRAINDIFFUSER_NET_SIZE, "bilinear")


_PROTOCOLS: dict[str, type[Protocol]] = {"mindeye2": MindEye2Protocol, "braindiffuser": BrainDiffuserProtocol}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """Return the :class:`Protocol` called ``protocol`` (an instance passes through).

    Raises:
        BrainITError: unknown name.
    """
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in _PROTOCOLS:
        raise BrainITError(
            f"unknown evaluation protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )
    return _PROTOCOLS[protocol]()
