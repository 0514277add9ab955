"""Factories for the frozen feature networks of the image metrics (and their tiny twins).

``build_metric_net(name)`` returns a :class:`MetricNet`: images in [0, 1] of any size go in, one flat
feature per image comes out, with the protocol's exact resize and the network's normalisation inside.

=========  ==============================================  ===========  ===========  =========
name       network (weights)                               node         MindEye2 in  normalise
=========  ==============================================  ===========  ===========  =========
alexnet2   torchvision AlexNet, IMAGENET1K_V1              features.4   256²         ImageNet
alexnet5   the same network                                features.11  256²         ImageNet
inception  torchvision Inception v3, IMAGENET1K_V1         avgpool      342²         ImageNet
clip       OpenAI CLIP ViT-L/14 (open_clip, QuickGELU)     image embed  224²         CLIP
effnet     torchvision EfficientNet-B1, IMAGENET1K_V2 (*)  avgpool      255²         ImageNet
swav       SwAV ResNet-50, 800 epochs (facebookresearch)   avgpool      224²         ImageNet
=========  ==============================================  ===========  ===========  =========

(IMAGENET1K_V1 / V2 are the DEFAULT weights of torchvision 0.16 and later, which MindEye2 asks for.) Under
the ``braindiffuser`` protocol every network gets 224² inputs, and (*) EfficientNet-B1 has the
IMAGENET1K_V1 weights: Brain-Diffuser's ``efficientnet_b1(weights=True)`` is torchvision's legacy
``pretrained=True``, whose default is V1 (the protocol's ``net_weights``).

Real weights come only from local files (``WEIGHT_FILES``, data/README.md), found, read and checked by
:mod:`brainit_pl.backbones.weights` like every backbone's. A tiny twin (``tiny=True``,
:mod:`brainit_pl.metrics.nets_tiny`) has the same interface and output structure, is random and seeded,
and loads a weight file through the same code as the real network. A :class:`MetricNet` is a
:class:`~brainit_pl.backbones.frozen.FrozenBackbone` (frozen, never in a checkpoint); it moves itself to
the device of the images it is given.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from brainit_pl.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenBackbone, seeded
from brainit_pl.backbones.weights import WEIGHT_FILES, load_checked, read_state_dict, resolve_weights
from brainit_pl.errors import BrainITError
from brainit_pl.metrics.nets_tiny import TINY_CLIP_CFG, TinyAlexNet, TinyPooled, tiny_efficientnet
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, Protocol, get_protocol

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class MetricNet(FrozenBackbone):
    """A frozen feature network with its preprocessing: (B, 3, H, W) in [0, 1] → (B, D) float32.

    As a :class:`~brainit_pl.backbones.frozen.FrozenBackbone` it keeps ``body`` outside its module tree
    (its ``state_dict()`` and ``parameters()`` are empty) while ``.to()`` and dtype casts reach it.

    Args:
        name: registry name (``"alexnet2"``, ...).
        body: the network; returns a tensor, or a dict from which ``node`` is taken.
        input_size: side of the network input under the MindEye2 protocol.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        protocol: how images are resized to the input (see :mod:`brainit_pl.metrics.protocols`).
        node: key of the feature in the body's output dict, if any.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        protocol: str | Protocol = DEFAULT_PROTOCOL,
        node: str | None = None,
    ) -> None:
        super().__init__(body, image_size=input_size, mean=mean, std=std)
        self.name, self.node = name, node
        self.protocol = get_protocol(protocol)
        self.train(False)

    @property
    def body(self) -> nn.Module:
        """The frozen network (the same as :attr:`net`)."""
        return self.net

    @property
    def input_size(self) -> int:
        """Side of the network input under the MindEye2 protocol."""
        return self.image_size

    def train(self, mode: bool = True) -> MetricNet:
        """Stay in eval mode: batch norm and dropout must not change the features."""
        return super().train(False)

    def __deepcopy__(self, memo: dict) -> MetricNet:
        """Shared, not copied, when a metric is cloned (``Metric.clone``): it is frozen, and large."""
        return self

    def resize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, 3, S, S) float32, as the protocol resizes the network input."""
        return self.protocol.net_input(images, self.image_size)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features of a batch.

        Args:
            images: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, D) float32, the flattened feature.
        """
        if self.mean.device != images.device:
            self.to(images.device)  # follow the data: the metrics do not own this module
        out = self.net(self.preprocess(images))  # protocol resize to (B, 3, S, S), then normalise
        if self.node is not None:
            out = out[self.node]
        return out.flatten(1).float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, node={self.node!r}, protocol={self.protocol.name!r}"


@dataclass(frozen=True)
class MetricNetSpec:
    """Where a metric network comes from and how it is fed. Architectures are data, weights are files.

    Attributes:
        name: registry name.
        weights_key: its file in :data:`~brainit_pl.backbones.weights.WEIGHT_FILES`.
        arch: the architecture, for messages.
        input_size: input side under the MindEye2 protocol.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        node: the feature's node (``create_feature_extractor``), or ``None`` for CLIP's image embedding.
        build: ``build(tiny)`` → randomly initialised network (real or tiny twin).
        drop_keys: key prefixes of the file that the network does not use.
        may_miss: key prefixes of the network that the file may lack.
    """

    name: str
    weights_key: str
    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    node: str | None
    build: Callable[[bool], nn.Module]
    drop_keys: tuple[str, ...] = ()
    may_miss: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """The weight file's name in the weights folder (``WEIGHT_FILES[weights_key].path``)."""
        return WEIGHT_FILES[self.weights_key].path

    @property
    def url(self) -> str:
        """Where to download the weight file."""
        return WEIGHT_FILES[self.weights_key].url

    @property
    def size(self) -> str:
        """The weight file's size, as its source lists it."""
        return WEIGHT_FILES[self.weights_key].size

    def load(self, net: nn.Module, path: str | os.PathLike, *, tiny: bool = False) -> None:
        """Fill ``net`` (built by :attr:`build`) from the weight file ``path``; real nets and twins alike.

        Raises:
            BrainITError: an unreadable file, or one whose keys or shapes do not fit ``net``.
        """
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(self.drop_keys)}
        arch = f"{self.arch} (tiny twin)" if tiny else self.arch
        load_checked(net, state, source=path, arch=arch, may_miss=self.may_miss)


# ---------------------------------------------------------------------------------------- architectures
def _torchvision(
    builder: str, tiny: Callable[[], nn.Module], **kwargs: object
) -> Callable[[bool], nn.Module]:
    """``build(tiny)``: torchvision's ``builder(weights=None, **kwargs)``, or the tiny twin ``tiny()``."""

    def build(is_tiny: bool) -> nn.Module:
        import torchvision.models

        return tiny() if is_tiny else getattr(torchvision.models, builder)(weights=None, **kwargs)

    return build


_alexnet = _torchvision("alexnet", TinyAlexNet)
# With its pretrained weights torchvision sets transform_input=True (it re-maps ImageNet-normalised input to
# the [-1, 1] scaling the Google weights expect) and keeps the aux head (its keys are in the file).
_inception = _torchvision(
    "inception_v3", lambda: TinyPooled(8), aux_logits=True, transform_input=True, init_weights=False
)
_effnet = _torchvision("efficientnet_b1", tiny_efficientnet)
_swav = _torchvision("resnet50", lambda: TinyPooled(12))


def _clip(tiny: bool) -> nn.Module:
    import open_clip

    tiny_cfg = copy.deepcopy(TINY_CLIP_CFG) if tiny else {}
    # OpenAI's weights were trained with QuickGELU; open_clip's plain "ViT-L-14" config uses nn.GELU.
    # Weights are loaded afterwards; silence open_clip's "initialized randomly" warning.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True, **tiny_cfg)
    finally:
        logging.disable(previous)


_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
# SwAV's hub file: a "module."-prefixed ResNet-50 trunk, projection head and prototypes, no classifier (so
# torchvision's fc stays random; avgpool is before it). OpenAI's CLIP archive has 3 non-weight entries.
METRIC_NETS: dict[str, MetricNetSpec] = {
    spec.name: spec
    for spec in (
        MetricNetSpec("alexnet2", "alexnet", "torchvision AlexNet", 256, *_IMAGENET, "features.4", _alexnet),
        MetricNetSpec("alexnet5", "alexnet", "torchvision AlexNet", 256, *_IMAGENET, "features.11", _alexnet),
        MetricNetSpec("inception", "inception-v3", "torchvision Inception v3", 342, *_IMAGENET, "avgpool",
                      _inception),
        MetricNetSpec("clip", "openai-clip-vit-l-14", "open_clip ViT-L-14 (QuickGELU)", 224, CLIP_MEAN, CLIP_STD,
                      None, _clip, drop_keys=("input_resolution", "context_length", "vocab_size")),
        MetricNetSpec("effnet", "efficientnet-b1", "torchvision EfficientNet-B1", 255, *_IMAGENET, "avgpool",
                      _effnet),
        MetricNetSpec("swav", "swav-rn50", "torchvision ResNet-50 (SwAV trunk)", 224, *_IMAGENET, "avgpool",
                      _swav, drop_keys=("projection_head.", "prototypes."), may_miss=("fc.",)),
    )
}  # fmt: skip


def _spec(name: str) -> MetricNetSpec:
    if name not in METRIC_NETS:
        raise BrainITError(f"unknown metric network {name!r}; expected one of {', '.join(METRIC_NETS)}")
    return METRIC_NETS[name]


def build_bare_metric_net(name: str, *, tiny: bool = False, seed: int = 0) -> nn.Module:
    """The bare, randomly initialised network ``name`` (seeded); its state dict is the weight-file format.

    Tests save a tiny twin's state dict with this and read it back through :func:`build_metric_net`.
    """
    spec = _spec(name)
    with seeded(seed):  # without touching the caller's random state
        return spec.build(tiny)


def build_metric_net(
    name: str,
    *,
    protocol: str | Protocol = DEFAULT_PROTOCOL,
    tiny: bool = False,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> MetricNet:
    """Build the frozen, eval-mode feature network ``name`` with its preprocessing.

    Args:
        name: one of :data:`METRIC_NETS` (``alexnet2``, ``alexnet5``, ``inception``, ``clip``, ``effnet``,
            ``swav``).
        protocol: ``"mindeye2"`` or ``"braindiffuser"`` (or a :class:`Protocol`): the input resize, and for
            ``effnet`` the default weight file (V2 for MindEye2, V1 for Brain-Diffuser).
        tiny: build the tiny twin (small, seeded, random unless ``weights`` is given).
        weights: a weight file to load. For a real network the default is its standard file in the weights
            folder; for a tiny twin the default is no file.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).
        random_init: real architecture with random weights, nothing loaded (benchmarks).
        seed: seed of the random initialisation (tiny twins and ``random_init``).

    Returns:
        A :class:`MetricNet` mapping (B, 3, H, W) images in [0, 1] to (B, D) features.

    Raises:
        BrainITError: unknown name, missing or unreadable weight file, or a file of another architecture.
    """
    spec = _spec(name)
    proto = get_protocol(protocol)
    path = None
    if weights is not None or not (tiny or random_init):  # fail on a missing file before the slow build
        key = proto.weights_key(name, spec.weights_key)  # Brain-Diffuser's EfficientNet-B1 is V1
        path = resolve_weights(key, weights, weights_dir=weights_dir)
    # Built with random weights, not on the meta device: a file may leave some (SwAV's fc) to the network.
    net = build_bare_metric_net(name, tiny=tiny, seed=seed)
    if path is not None:
        spec.load(net, path, tiny=tiny)
    net.eval()
    body: nn.Module
    if spec.node is not None:
        from torchvision.models.feature_extraction import create_feature_extractor

        # Inception's aux head makes its train and eval graphs differ; only the eval graph is used.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            body = create_feature_extractor(net, return_nodes=[spec.node])
    else:  # CLIP's un-normalised image embedding (MindEye2, Brain-Diffuser): encode_image is visual(x), so
        body = net.visual  # only the vision tower is kept; the text tower, needed to read the file, is freed
    return MetricNet(name, body, spec.input_size, spec.mean, spec.std, protocol=proto, node=spec.node)
