"""The two evaluation protocols: how every image is resized before a metric sees it.

Published NSD tables come from two evaluators that differ only in image preprocessing, so a protocol here is
exactly that: two functions, one for the pixel metrics (PixCorr, SSIM at 425²) and one for the network
inputs. The metric definitions themselves are shared. Never mix protocols in one table.

``mindeye2`` (default; MindEye2's ``final_evaluations`` notebook, torchvision 0.16.0 pinned in its
``setup.sh``):
    every image is first resized to 256² with torchvision's ``Resize((256, 256))`` on float tensors. In
    torchvision 0.16 the tensor ``Resize`` defaults to ``antialias=None``, which means *no* antialiasing
    for tensors (with a warning that the default would become ``True`` in 0.17). We reproduce that pinned
    behaviour: bilinear, ``antialias=False`` (``MindEye2Protocol(antialias=True)`` is the explicit
    alternative, what today's torchvision would do). From 256², the pixel metrics resize to 425² and each
    network to its own input size (AlexNet 256², Inception 342², CLIP 224², EfficientNet 255², SwAV 224²),
    the same way, in float32 torch. SSIM is skimage's 2-D SSIM of the grey image.

``braindiffuser`` (Brain-Diffuser's ``eval_extract_features.py`` / ``evaluate_reconstruction.py``):
    images are 8-bit PNGs handled by PIL. Pixel metrics: the image is resized to 425² with PIL's default
    ``Image.resize`` filter (bicubic; a 425² NSD ground truth is left untouched) and divided by 255.
    Networks: ``torchvision.transforms.functional.resize(pil_image, (224, 224))`` (PIL bilinear, which
    antialiases), ``to_tensor``, then the network's normalisation — every network at 224², whatever its
    MindEye2 size. Float inputs are rounded to 8 bits first, which is exact for images read from PNGs.
    SSIM: scikit-image 0.17.2 (pinned in its ``environment.yml``) called with ``multichannel=True`` on the
    2-D grey image treats the last axis as channels, so it averages 1-D SSIMs computed down each column
    (``ssim_mode = "columns"``). EfficientNet-B1 is ``efficientnet_b1(weights=True)``, which torchvision
    maps to ``IMAGENET1K_V1`` (``net_weights``).

A protocol carries a version string (:data:`PROTOCOL_VERSIONS`), bumped whenever its numbers change, and its
defining options (:meth:`Protocol.options`); both are written into metrics.json. Results written before
versions existed are labelled :data:`UNVERSIONED`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from brainit_pl.errors import BrainITError

if TYPE_CHECKING:  # torch is imported where it runs: `brainit-pl evaluate --help` stays fast
    from torch import Tensor

PROTOCOLS: tuple[str, ...] = ("mindeye2", "braindiffuser")
DEFAULT_PROTOCOL = "mindeye2"

COMMON_SIZE = 256  # MindEye2: every recon and ground truth is first brought to 256²
PIXEL_SIZE = 425  # PixCorr and SSIM are computed at the NSD stimulus size
BRAINDIFFUSER_NET_SIZE = 224  # Brain-Diffuser feeds every network 224² images
# MindEye2 pins torchvision 0.16.0, whose tensor Resize does not antialias by default (antialias=None).
MINDEYE2_ANTIALIAS = False
# Version of each protocol's numbers; bump it whenever a change alters them. Version 1 (never written into
# metrics.json) antialiased MindEye2's resizes, swapped the retrieval directions, drew the retrieval subsets
# with seed 0, computed Brain-Diffuser's SSIM in 2-D and used EfficientNet-B1 IMAGENET1K_V2 for it.
PROTOCOL_VERSIONS: dict[str, str] = {"mindeye2": "2", "braindiffuser": "2"}
UNVERSIONED = "unversioned (before protocol versions; numbers from the pre-2 evaluator)"
SSIM_MODES: tuple[str, ...] = ("2d", "columns")
SUBSET_SIZE = 300  # MindEye2's retrieval: 300-way top-1
RETRIEVAL_SEED = 42  # MindEye2's final_evaluations: utils.seed_everything(42) (its --seed default)


def resize_bilinear(images: Tensor, size: int, antialias: bool = True) -> Tensor:
    """Resize like torchvision ``Resize((size, size), antialias=antialias)`` on float tensors (bilinear).

    Args:
        images: (B, C, H, W) float.
        size: output side.
        antialias: ``True`` (torchvision ≥ 0.17's default; kept as this helper's default for its other
            users) or ``False`` (torchvision 0.16's tensor default, which :class:`MindEye2Protocol` passes).

    Returns:
        (B, C, size, size), same dtype; the input itself when it is already that size (as torchvision does).
    """
    if images.shape[-2:] == (size, size):
        return images
    from torch.nn.functional import interpolate

    return interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def resize_pil(images: Tensor, size: int, resample: str) -> Tensor:
    """Resize each image with PIL in 8 bits, as Brain-Diffuser's scripts do.

    Args:
        images: (B, 3, H, W) float in [0, 1]; rounded to uint8 first.
        size: output side.
        resample: ``"bilinear"`` or ``"bicubic"`` (PIL filters; both antialias when shrinking).

    Returns:
        (B, 3, size, size) float32 in [0, 1] (multiples of 1/255), on the input's device.
    """
    import torch
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
    """Image preprocessing, SSIM variant and network weights of one published evaluator.

    Attributes:
        name: ``"mindeye2"`` or ``"braindiffuser"``.
        ssim_mode: ``"2d"`` (skimage's SSIM of the grey image) or ``"columns"`` (the mean of 1-D SSIMs
            down each column: skimage 0.17.2's ``multichannel=True`` on a 2-D array).
        net_weights: metric network name → key of its weight file where the evaluator used other weights
            than the default ones (``WEIGHT_FILES``).
    """

    name: str = ""
    ssim_mode: str = "2d"
    net_weights: dict[str, str] = {}

    @property
    def version(self) -> str:
        """Version of this protocol's numbers (:data:`PROTOCOL_VERSIONS`)."""
        return PROTOCOL_VERSIONS[self.name]

    def options(self) -> dict[str, object]:
        """The options that define the protocol's numbers, as plain JSON values."""
        return {"ssim": self.ssim_mode, "net_weights": dict(self.net_weights)}

    def describe(self) -> dict[str, object]:
        """``{"protocol", "protocol_version", "protocol_options"}``, as written into metrics.json."""
        return {"protocol": self.name, "protocol_version": self.version, "protocol_options": self.options()}

    def weights_key(self, net: str, default: str) -> str:
        """Weight-file key of metric network ``net`` under this protocol (``default`` unless overridden)."""
        return self.net_weights.get(net, default)

    def pixel_input(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1] → (B, 3, 425, 425) float32, what PixCorr and SSIM compare."""
        raise NotImplementedError

    def net_input(self, images: Tensor, size: int) -> Tensor:
        """(B, 3, H, W) float in [0, 1] → (B, 3, S, S) float32 network input before normalisation.

        ``size`` is the network's MindEye2 input side; Brain-Diffuser ignores it (always 224²).
        """
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Protocol) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash((self.name, repr(self.options())))

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"Protocol({self.name!r}, {options})"


class MindEye2Protocol(Protocol):
    """MindEye2: 256² first, then bilinear torch resizes (no antialiasing, as in torchvision 0.16); any device.

    Args:
        antialias: antialias the bilinear resizes. ``False`` (default) reproduces MindEye2's pinned
            torchvision 0.16.0; ``True`` is what the same code does under torchvision ≥ 0.17.
    """

    name = "mindeye2"

    def __init__(self, antialias: bool = MINDEYE2_ANTIALIAS) -> None:
        self.antialias = bool(antialias)

    def options(self) -> dict[str, object]:
        return {
            "resize": "bilinear",
            "antialias": self.antialias,
            "common_size": COMMON_SIZE,
            **super().options(),
        }

    def _resize(self, images: Tensor, size: int) -> Tensor:
        return resize_bilinear(
            resize_bilinear(images.float(), COMMON_SIZE, self.antialias), size, self.antialias
        )

    def pixel_input(self, images: Tensor) -> Tensor:
        return self._resize(images, PIXEL_SIZE)

    def net_input(self, images: Tensor, size: int) -> Tensor:
        return self._resize(images, size)


class BrainDiffuserProtocol(Protocol):
    """Brain-Diffuser: PIL resizes of 8-bit images straight from the originals (CPU), column SSIM, EffNet V1."""

    name = "braindiffuser"
    ssim_mode = "columns"
    net_weights = {"effnet": "efficientnet-b1-v1"}

    def options(self) -> dict[str, object]:
        return {"resize": "PIL (pixels: bicubic 425²; networks: bilinear 224²)", **super().options()}

    def pixel_input(self, images: Tensor) -> Tensor:
        return resize_pil(images, PIXEL_SIZE, "bicubic")

    def net_input(self, images: Tensor, size: int) -> Tensor:
        return resize_pil(images, BRAINDIFFUSER_NET_SIZE, "bilinear")


_PROTOCOLS: dict[str, type[Protocol]] = {"mindeye2": MindEye2Protocol, "braindiffuser": BrainDiffuserProtocol}


def get_protocol(protocol: str | Protocol, **options: object) -> Protocol:
    """Return the :class:`Protocol` called ``protocol`` (an instance passes through, if no options are given).

    Args:
        protocol: a name of :data:`PROTOCOLS`, or a :class:`Protocol`.
        **options: the protocol's constructor options (``antialias`` for ``mindeye2``).

    Raises:
        BrainITError: unknown name, or an option the protocol does not have.
    """
    if isinstance(protocol, Protocol):
        if options:
            raise BrainITError(f"options {sorted(options)} cannot be applied to an existing {protocol!r}")
        return protocol
    if protocol not in _PROTOCOLS:
        raise BrainITError(
            f"unknown evaluation protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )
    try:
        return _PROTOCOLS[protocol](**options)
    except TypeError as err:
        raise BrainITError(
            f"protocol {protocol!r} does not take the options {sorted(options)}: {err}"
        ) from err
