"""The tiny twins of the metric networks: the real networks' output structure, a few channels, no file.

Each twin keeps what :mod:`brainit_pl.metrics.nets` relies on — the node names its feature is
read from (AlexNet's ``features.4``/``features.11``, ``avgpool``) and, for EfficientNet and CLIP, the real
classes in a tiny configuration — so twins and real networks share the feature extraction and the
weight-loading code. They are random (the caller seeds them) and build and run instantly on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# open_clip config overrides for a tiny "ViT-L-14": 2 layers of width 64, patch 32 at 224².
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


class TinyAlexNet(nn.Module):
    """AlexNet's layer indexing (ReLUs at features.4 and features.11) with a few channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),  # 0-2
            nn.Conv2d(8, 12, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),  # 3-5
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(inplace=True),  # 6-7
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),  # 8-9
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),  # 10-12
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, 16, h, w) ``features`` output."""
        return self.features(x)


class TinyPooled(nn.Module):
    """A strided conv stack ending in ``avgpool`` and ``fc``, standing in for Inception and ResNet-50.

    Args:
        width: channels of the first conv (the second has twice as many).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=4, padding=3), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, 10) logits (the features are read at ``avgpool``)."""
        return self.fc(torch.flatten(self.avgpool(self.stem(x)), 1))


def tiny_efficientnet() -> nn.Module:
    """torchvision's ``EfficientNet`` class in a two-block configuration (its ``avgpool`` gives 24 features)."""
    from torchvision.models import EfficientNet
    from torchvision.models.efficientnet import MBConvConfig

    blocks = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 12, 1)]
    return EfficientNet(blocks, dropout=0.2, last_channel=24)
