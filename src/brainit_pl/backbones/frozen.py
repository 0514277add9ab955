"""Keeping pretrained networks frozen, out of checkpoints, and fed the input they were trained on.

A network is wrapped in a :class:`FrozenBackbone`: eval mode, no gradients to its weights, and held outside
the module tree so that it never lands in a checkpoint or an optimizer, while ``.to(device)`` and dtype
casts still reach it. Its weights come from :mod:`brainit_pl.backbones.weights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainit_pl.errors import require

# torchvision's ImageNet statistics (the VGG16-BN, DINOv2 and torchvision metric networks' normalisation).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore the global CPU RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FrozenBackbone(nn.Module):
    """A pretrained network, frozen and kept out of checkpoints, with its input preprocessing.

    The network is stored outside ``_modules`` on purpose: a model that owns a backbone then has no
    backbone keys in ``state_dict()`` and no backbone parameters in ``parameters()``, so it can never be
    saved, loaded or optimised by accident. ``.to()``, ``.half()`` and friends still reach it (see
    :meth:`_apply`). Gradients do flow to the *input* (the DIP optimises an image through VGG); wrap
    calls in ``torch.no_grad()`` when only the features are wanted.

    Args:
        net: the network; set to eval mode with ``requires_grad=False``.
        image_size: the input size the network expects; other sizes are resized in :meth:`preprocess`.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        resize_mode: ``F.interpolate`` mode for the (anti-aliased) resize.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        net.eval().requires_grad_(False)
        object.__setattr__(self, "_net", net)  # bypass nn.Module registration (see the class docstring)
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def net(self) -> nn.Module:
        """The frozen network (read-only access, e.g. to its blocks)."""
        return self._net

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FrozenBackbone:
        self._net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Switch this wrapper's mode; the frozen network itself stays in eval mode."""
        super().train(mode)
        self._net.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize images in [0, 1] (B, 3, H, W) to (B, 3, S, S) and normalise them with mean/std."""
        return self.normalize(self.resize(self.check(images)))

    def check(self, images: Tensor) -> Tensor:
        """Validate a batch of images (B, 3, H, W) and return it as float32."""
        require(
            images.ndim == 4 and images.shape[1] == 3,
            f"{type(self).__name__} expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}",
        )
        return images.to(torch.float32)

    def normalize(self, images: Tensor) -> Tensor:
        """(x - mean) / std per channel, cast to the network's dtype."""
        dtype = next(self._net.parameters()).dtype
        return ((images - self.mean) / self.std).to(dtype)

    def resize(self, images: Tensor) -> Tensor:
        """Anti-aliased resize of (B, 3, H, W) to (B, 3, S, S); a no-op at the right size."""
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return F.interpolate(
            images, size=(self.image_size, self.image_size), mode=self.resize_mode, antialias=True
        )

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self._net.parameters())
        return f"net={type(self._net).__name__} ({n:,} frozen parameters), image_size={self.image_size}"
