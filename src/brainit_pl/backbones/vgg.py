"""VGG16-BN feature maps and the low-level tokens made from them (docs/method.md §5, §6.1).

``build_vgg()`` gives torchvision's VGG16-BN ``features`` up to relu5_3 as a frozen module mapping images
in [0, 1] to the five maps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (``features`` indices 5, 12, 22,
32, 42) of the ImageNet-normalised 112² image: 64×112², 128×56², 256×28², 512×14², 512×7².
``build_vgg(None, tiny=True)`` is its twin: the same layers and channel counts with seeded random
weights, initialised as torchvision initialises VGG16-BN and with its BatchNorm statistics calibrated on
1/f-noise images, so that its features, like a trained network's, carry image information at every scale
(building it takes ~0.5 s and a forward pass at batch 2 ~0.15 s on 2 CPU cores, so nothing smaller is
needed, and its tokens have the real 7,190 × 512 layout).

The tokens (the low-level BIT's targets) are too large to cache (7,190 × 512 per image), so
:class:`VGGTokens` computes them from the image batch on the fly. :func:`vgg_maps_to_tokens` and its
inverse :func:`vgg_tokens_to_maps` (used by the DIP) are pure functions of the maps, pinned by the
reference vectors in ``tests/data/brainit_reference.npz``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainit_pl.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenBackbone, seeded
from brainit_pl.backbones.weights import (
    load_checked,
    read_state_dict,
    resolve_weights,
)
from brainit_pl.errors import require

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
TAPS = (5, 12, 22, 32, 42)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16_bn.features


@dataclass(frozen=True)
class TokenRule:
    """How one feature map becomes tokens.

    Attributes:
        kernel: patch side (1: one token per position).
        stride: patch stride (``kernel`` for non-overlapping patches).
        repeat: how many times each patch vector is concatenated with itself.
    """

    kernel: int
    stride: int
    repeat: int


# docs/method.md §5: relu1_2 2×2 patches stride 2, ×2; relu2_2 2×2 patches stride 1; relu3_3 per position, ×2;
# relu4_3 and relu5_3 per position. With VGG16-BN's channels every scale gives 512-wide tokens.
VGG_TOKEN_RULES = (
    TokenRule(kernel=2, stride=2, repeat=2),
    TokenRule(kernel=2, stride=1, repeat=1),
    TokenRule(kernel=1, stride=1, repeat=2),
    TokenRule(kernel=1, stride=1, repeat=1),
    TokenRule(kernel=1, stride=1, repeat=1),
)


@dataclass(frozen=True)
class VGGTokenLayout:
    """Where each scale's tokens sit in the concatenated sequence.

    Attributes:
        map_shapes: (C, H, W) of each feature map.
        counts: tokens per scale T_i.
        offsets: start of each scale in the concatenation (``offsets[i] + counts[i] == offsets[i + 1]``).
        width: token width D (the same for every scale).
    """

    map_shapes: tuple[tuple[int, int, int], ...]
    counts: tuple[int, ...]
    offsets: tuple[int, ...]
    width: int

    @property
    def total(self) -> int:
        """All tokens T = Σ T_i (7,190 at 112²)."""
        return sum(self.counts)

    def split(self, tokens: Tensor) -> list[Tensor]:
        """(B, T, D) concatenated tokens → the per-scale list [(B, T_i, D)]."""
        return list(torch.split(tokens, self.counts, dim=1))


def vgg_token_layout(
    map_shapes: Sequence[Sequence[int]], rules: Sequence[TokenRule] = VGG_TOKEN_RULES
) -> VGGTokenLayout:
    """The token layout of feature maps of shapes (C, H, W) under ``rules``.

    Raises:
        ValueError: the scales would give tokens of different widths.
    """
    shapes = tuple((int(c), int(h), int(w)) for c, h, w in map_shapes)
    widths = {c * r.kernel**2 * r.repeat for (c, _, _), r in zip(shapes, rules, strict=True)}
    if len(widths) != 1:
        raise ValueError(f"feature maps {shapes} give tokens of several widths {sorted(widths)}")
    counts = tuple(
        ((h - r.kernel) // r.stride + 1) * ((w - r.kernel) // r.stride + 1)
        for (_, h, w), r in zip(shapes, rules, strict=True)
    )
    offsets = tuple(sum(counts[:i]) for i in range(len(counts)))
    return VGGTokenLayout(map_shapes=shapes, counts=counts, offsets=offsets, width=widths.pop())


def vgg_maps_to_tokens(maps: Sequence[Tensor], rules: Sequence[TokenRule] = VGG_TOKEN_RULES) -> list[Tensor]:
    """Feature maps → tokens, scale by scale.

    Patches are taken as ``F.unfold`` does: each token is a channel-major vector (c, dy, dx) of length
    C·k², tokens in row-major order of their patch position; a repeated vector is concatenated with itself.

    Args:
        maps: [(B, C_i, H_i, W_i)] (relu1_2..relu5_3).
        rules: one :class:`TokenRule` per map.

    Returns:
        [(B, T_i, D)], D = C_i · k_i² · repeat_i.
    """
    tokens = []
    for fmap, rule in zip(maps, rules, strict=True):
        if rule.kernel == 1:
            t = fmap.flatten(2).transpose(1, 2)  # (B, H·W, C)
        else:
            t = F.unfold(fmap, rule.kernel, stride=rule.stride).transpose(1, 2)  # (B, L, C·k²)
        tokens.append(t.repeat(1, 1, rule.repeat) if rule.repeat > 1 else t)  # (B, T_i, D)
    return tokens


def vgg_tokens_to_maps(
    tokens: Sequence[Tensor], map_sizes: Sequence[Sequence[int]], rules: Sequence[TokenRule] = VGG_TOKEN_RULES
) -> list[Tensor]:
    """Tokens → feature maps, the inverse of :func:`vgg_maps_to_tokens` (the DIP's targets).

    Repeated copies are averaged, then patches are folded back with every position the mean of all
    patch entries that cover it, so tokens that disagree (predictions) still give one map.

    Args:
        tokens: [(B, T_i, D)].
        map_sizes: (H_i, W_i) of each map.
        rules: one :class:`TokenRule` per scale.

    Returns:
        [(B, C_i, H_i, W_i)], C_i = D / (k_i² · repeat_i).
    """
    maps = []
    for t, (h, w), rule in zip(tokens, map_sizes, rules, strict=True):
        b, n, d = t.shape
        t = t.reshape(b, n, rule.repeat, d // rule.repeat).mean(dim=2)  # (B, T_i, C·k²)
        if rule.kernel == 1:
            maps.append(t.transpose(1, 2).reshape(b, -1, h, w))
            continue
        cols = t.transpose(1, 2)  # (B, C·k², L)
        size, k, s = (int(h), int(w)), rule.kernel, rule.stride
        summed = F.fold(cols, size, k, stride=s)  # (B, C, H, W)
        ones = torch.ones(1, k * k, n, dtype=t.dtype, device=t.device)
        cover = F.fold(ones, size, k, stride=s)  # (1, 1, H, W): patches covering each position
        maps.append(summed / cover.clamp_min(1.0))
    return maps


class VGGFeatures(FrozenBackbone):
    """Frozen VGG16-BN ``features`` returning the five tapped maps.

    Attributes:
        channels: channels of the five maps (64, 128, 256, 512, 512).
    """

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__(features, image_size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.channels = tuple(_out_channels(features, i) for i in TAPS)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of a batch of images; gradients reach ``images``.

        Args:
            images: (B, 3, H, W) in [0, 1]; resized (anti-aliased) to 112² if needed.

        Returns:
            [(B, 64, 112, 112), (B, 128, 56, 56), (B, 256, 28, 28), (B, 512, 14, 14), (B, 512, 7, 7)].
        """
        x = self.preprocess(images)
        maps = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in TAPS:
                maps.append(x)
        return maps


class VGGTokens(nn.Module):
    """The low-level targets: VGG16-BN maps of an image batch turned into 7,190 tokens × 512.

    Args:
        vgg: the frozen feature network (:func:`build_vgg`).
    """

    def __init__(self, vgg: VGGFeatures) -> None:
        super().__init__()
        self.vgg = vgg  # holds no state: FrozenBackbone keeps its network out of state_dict()
        size = vgg.image_size
        sides = [size // 2**i for i in range(len(TAPS))]
        self.layout = vgg_token_layout([(c, s, s) for c, s in zip(vgg.channels, sides, strict=True)])

    def forward(self, images: Tensor) -> Tensor:
        """Tokens of a batch of images (call under ``torch.no_grad()`` for targets).

        Args:
            images: (B, 3, H, W) in [0, 1].

        Returns:
            (B, T, D) tokens, scales concatenated in order (T = 7,190, D = 512); ``layout.split`` separates them.
        """
        return torch.cat(vgg_maps_to_tokens(self.vgg(images)), dim=1)

    def to_maps(self, tokens: Tensor) -> list[Tensor]:
        """(B, T, D) tokens (e.g. predicted) → the five feature maps [(B, C_i, H_i, W_i)] they stand for."""
        sizes = [(h, w) for _, h, w in self.layout.map_shapes]
        return vgg_tokens_to_maps(self.layout.split(tokens), sizes)


def build_vgg(
    weights: str | Path | None = None,
    *,
    tiny: bool = False,
    seed: int = 0,
    weights_dir: str | Path | None = None,
    slim: int = 1,
) -> VGGFeatures:
    """Build frozen VGG16-BN features up to relu5_3.

    Args:
        weights: a torchvision VGG16-BN state dict file (``vgg16_bn-6c64b313.pth``, or any file with the
            same ``features.*`` keys, a tiny twin's included). ``None``: the real network reads
            ``vgg16_bn-6c64b313.pth`` from the weights folder; the tiny twin gets seeded random weights
            (torchvision's init, calibrated BatchNorm statistics).
        tiny: build the tiny twin (same layers, random weights) when ``weights`` is ``None``.
        seed: seed of the tiny twin's random weights.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).
        slim: divide every conv's channels by this (tiny twin only). VGG16-BN's channel ratios are kept, so
            the tokens keep their layout (7,190 positions) at width 512 / ``slim``, for ~``slim``² fewer
            FLOPs: what lets the simulated demo compute low-level targets on the fly on a CPU.

    Returns:
        A :class:`VGGFeatures`: images in [0, 1] (B, 3, H, W) → five maps.

    Raises:
        BrainITError: a missing file or a file of another architecture.
    """
    require(slim >= 1 and 64 % slim == 0, f"slim must divide 64, got {slim}")
    require(slim == 1 or (tiny and weights is None), "slim VGGs exist only as the tiny random twin")
    if tiny and weights is None:
        with seeded(seed):
            features = _features(slim)
            _init_like_torchvision(features)
            vgg = VGGFeatures(features)
            _calibrate_batchnorm(vgg, _pink_noise(CALIBRATION_IMAGES, IMAGE_SIZE))
        return vgg
    path = resolve_weights("vgg16-bn", weights, weights_dir=weights_dir)
    with torch.device("meta"):
        features = _features()
    # Only ``features.*`` is read: the file's classifier is never used, and is not built.
    state = read_state_dict(path, prefix="features.")
    load_checked(features, state, source=path, arch="torchvision VGG16-BN features")
    log.info("loaded VGG16-BN features from %s", path)
    return VGGFeatures(features)


def _features(slim: int = 1) -> nn.Sequential:
    """torchvision's ``vgg16_bn().features`` up to relu5_3 (the final max-pool dropped), channels / ``slim``."""
    from torchvision.models.vgg import cfgs, make_layers

    # make_layers(cfgs["D"], batch_norm=True) is exactly how torchvision's vgg16_bn builds its features,
    # so the keys match its weight file without building the 120M-parameter classifier.
    cfg = [v if v == "M" else v // slim for v in cfgs["D"]]
    return make_layers(cfg, batch_norm=True)[: TAPS[-1] + 1]


CALIBRATION_IMAGES = 8  # BatchNorm statistics over 8 × H × W positions per channel (≥ 392 at relu5_3)


def _init_like_torchvision(features: nn.Sequential) -> None:
    """torchvision's own VGG initialisation (``VGG._initialize_weights``), which ``make_layers`` skips.

    Without it the convolutions keep PyTorch's default init (variance 1 / (3 fan_in)): each layer shrinks
    the signal ~2.5× while its bias does not, so relu3_3..relu5_3 of the twin were ~99.9 % an
    image-independent constant (image-specific rms 4e-2..2e-4 of the token norm) and three of the five
    low-level InfoNCE scales had nothing to learn (issue #4).
    """
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _pink_noise(n: int, size: int) -> Tensor:
    """(n, 3, size, size) images in [0, 1] with a 1/f amplitude spectrum (natural images' second-order statistics)."""
    freq = torch.fft.fftfreq(size)
    radius = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt().clamp_min(1.0 / size)  # (size, size)
    phase = torch.randn(n, 3, size, size)
    field = torch.fft.ifft2(torch.fft.fft2(phase) / radius).real  # (n, 3, size, size)
    field = field + 0.5 * field.mean(1, keepdim=True)  # colour channels correlated, as in photographs
    lo = field.flatten(1).quantile(0.01, dim=1)[:, None, None, None]
    hi = field.flatten(1).quantile(0.99, dim=1)[:, None, None, None]
    return ((field - lo) / (hi - lo)).clamp(0, 1)


@torch.no_grad()
def _calibrate_batchnorm(vgg: VGGFeatures, images: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (a forward pass in train mode).

    A trained VGG16-BN's running statistics standardise each channel over natural images; a random twin's
    defaults (mean 0, variance 1) do not, and its deeper maps drift in scale. Calibrated, the twin's five
    scales have similar token norms and 30–50 % of their energy in the image-independent mean (a real
    network's features have the same kind of statistics), so the low-level loss sees image information at
    every scale.
    """
    norms = [m for m in vgg.net.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this batch's statistics
    vgg.net.train()  # the wrapper keeps its network in eval mode; this pass alone needs train mode
    vgg.net(vgg.preprocess(images))
    vgg.net.eval()
    for norm in norms:
        norm.momentum = 0.1  # torchvision's default, should anyone fine-tune the twin


def _out_channels(features: nn.Sequential, index: int) -> int:
    convs = [m for m in features[: index + 1] if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels
