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
effnet     torchvision EfficientNet-B1, IMAGENET1K_V2      avgpool      255²         ImageNet
swav       SwAV ResNet-50, 800 epochs (facebookresearch)   avgpool      224²         ImageNet
=========  ==============================================  ===========  ===========  =========

(IMAGENET1K_V1 / V2 are the DEFAULT weights of torchvision 0.29, which MindEye2 asks for.) Under the
``braindiffuser`` protocol every network gets 224² inputs.

Real weights come only from local files in the weights folder: the ``weights_dir`` argument, else the
``BRAINIT_WEIGHTS`` environment variable, else ``~/.cache/brainit-pl/weights`` (data/README.md lists the
files and where to get them). A tiny twin (``tiny=True``) has the same interface and output structure, is
random and seeded, and loads a weight file through the same code as the real network.

The network is deliberately not a submodule of the metrics that use it: it never lands in a checkpoint,
and it moves itself to the device of the images it is given.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from brainit_pl.errors import BrainITError
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, Protocol, get_protocol

WEIGHTS_ENV = "BRAINIT_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/brainit-pl/weights")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class MetricNet(nn.Module):
    """A frozen feature network with its preprocessing: (B, 3, H, W) in [0, 1] → (B, D) float32.

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
        super().__init__()
        self.name, self.input_size, self.node = name, input_size, node
        self.protocol = get_protocol(protocol)
        self.body = body
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> MetricNet:
        """Stay in eval mode: batch norm and dropout must not change the features."""
        return super().train(False)

    def __deepcopy__(self, memo: dict) -> MetricNet:
        """Shared, not copied, when a metric is cloned (``Metric.clone``): it is frozen, and large."""
        return self

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
        x = self.protocol.net_input(images, self.input_size)  # (B, 3, S, S)
        x = (x - self.mean) / self.std
        out = self.body(x)
        if self.node is not None:
            out = out[self.node]
        return out.flatten(1).float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, node={self.node!r}, protocol={self.protocol.name!r}"


@dataclass(frozen=True)
class MetricNetSpec:
    """Where a metric network comes from and how it is fed. Architectures are data, weights are files."""

    name: str
    filename: str
    url: str
    size: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    node: str | None
    build: Callable[[bool], nn.Module]  # build(tiny) -> randomly initialised network
    load: Callable[[nn.Module, Path], None]  # load(network, file), shared by real nets and tiny twins


# ---------------------------------------------------------------------------------------------- weights
def weights_folder(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding metric weight files: the argument, else ``$BRAINIT_WEIGHTS``, else the default."""
    chosen = weights_dir or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR
    return Path(chosen).expanduser()


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (OpenAI's CLIP ``.pt`` files are TorchScript, not pickles)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("constants.pkl") for entry in archive.namelist())


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict safely (``weights_only``); unwrap ``state_dict`` and strip DataParallel's ``module.``."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI ships CLIP that way
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download or a wrong file is a user error
        raise BrainITError(f"cannot read weight file {path}: {err.__class__.__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BrainITError(f"weight file {path} holds a {type(state).__name__}, not a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _load_strict(
    net: nn.Module, path: Path, drop_prefixes: tuple[str, ...] = (), may_miss: tuple[str, ...] = ()
) -> None:
    """Load ``path`` into ``net``; only keys under ``may_miss`` may be missing. Errors name the file."""
    # Non-persistent buffers (e.g. CLIP's causal mask) are rebuilt by the network; TorchScript files keep them.
    transient = {name for name, _ in net.named_buffers()} - set(net.state_dict())
    state = {
        k: v
        for k, v in read_state_dict(path).items()
        if not k.startswith(drop_prefixes) and k not in transient
    }
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise BrainITError(
            f"weight file {path} does not fit this network: {str(err).splitlines()[0]}"
        ) from err
    missing = [k for k in missing if not k.startswith(may_miss)]
    if missing or unexpected:
        raise BrainITError(
            f"weight file {path} does not fit this network: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _load_torchvision(net: nn.Module, path: Path) -> None:
    _load_strict(net, path)


def _load_swav(net: nn.Module, path: Path) -> None:
    # facebookresearch/swav's hub checkpoint: "module."-prefixed ResNet-50 trunk plus the SwAV projection
    # head and prototypes; it has no classifier, so torchvision's fc stays random (avgpool is before it).
    _load_strict(net, path, drop_prefixes=("projection_head.", "prototypes."), may_miss=("fc.",))


def _load_clip(net: nn.Module, path: Path) -> None:
    # OpenAI's TorchScript archive also holds three non-tensor entries, which open_clip drops too.
    _load_strict(net, path, drop_prefixes=("input_resolution", "context_length", "vocab_size"))


# ---------------------------------------------------------------------------------------- architectures
class _TinyAlexNet(nn.Module):
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
        return self.features(x)


class _TinyPooled(nn.Module):
    """A strided conv stack ending in ``avgpool`` and ``fc``, standing in for Inception and ResNet-50."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=4, padding=3), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.stem(x)), 1))


def _alexnet(tiny: bool) -> nn.Module:
    from torchvision.models import alexnet

    return _TinyAlexNet() if tiny else alexnet(weights=None)


def _inception(tiny: bool) -> nn.Module:
    from torchvision.models import inception_v3

    # With its pretrained weights torchvision sets transform_input=True (it re-maps ImageNet-normalised
    # input to the [-1, 1] scaling the Google weights expect) and keeps the aux head (its keys are in the file).
    return (
        _TinyPooled(8)
        if tiny
        else inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    )


def _effnet(tiny: bool) -> nn.Module:
    from torchvision.models import EfficientNet, efficientnet_b1
    from torchvision.models.efficientnet import MBConvConfig

    if not tiny:
        return efficientnet_b1(weights=None)
    blocks = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 12, 1)]
    return EfficientNet(blocks, dropout=0.2, last_channel=24)  # the real class, tiny configuration


def _swav(tiny: bool) -> nn.Module:
    from torchvision.models import resnet50

    return _TinyPooled(12) if tiny else resnet50(weights=None)


def _clip(tiny: bool) -> nn.Module:
    import open_clip

    tiny_cfg = {}
    if tiny:
        tiny_cfg = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
        }
    # OpenAI's weights were trained with QuickGELU; open_clip's plain "ViT-L-14" config uses nn.GELU.
    # Weights are loaded afterwards by _load_clip; silence open_clip's "initialized randomly" warning.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True, **tiny_cfg)
    finally:
        logging.disable(previous)


class _ClipImageEncoder(nn.Module):
    """CLIP's ``encode_image``: the un-normalised image embedding, as MindEye2 and Brain-Diffuser use it.

    Holds only the vision tower (open_clip's ``encode_image`` is ``visual(x)``); the text tower, needed only
    to read the checkpoint, is freed.
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.visual = clip_model.visual

    def forward(self, x: Tensor) -> Tensor:
        return self.visual(x)


_TV = "https://download.pytorch.org/models/"
METRIC_NETS: dict[str, MetricNetSpec] = {
    spec.name: spec
    for spec in (
        MetricNetSpec("alexnet2", "alexnet-owt-7be5be79.pth", _TV + "alexnet-owt-7be5be79.pth", "233 MB",
                      256, IMAGENET_MEAN, IMAGENET_STD, "features.4", _alexnet, _load_torchvision),
        MetricNetSpec("alexnet5", "alexnet-owt-7be5be79.pth", _TV + "alexnet-owt-7be5be79.pth", "233 MB",
                      256, IMAGENET_MEAN, IMAGENET_STD, "features.11", _alexnet, _load_torchvision),
        MetricNetSpec("inception", "inception_v3_google-0cc3c7bd.pth", _TV + "inception_v3_google-0cc3c7bd.pth",
                      "104 MB", 342, IMAGENET_MEAN, IMAGENET_STD, "avgpool", _inception, _load_torchvision),
        MetricNetSpec("clip", "ViT-L-14.pt",
                      "https://openaipublic.azureedge.net/clip/models/"
                      "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
                      "890 MB", 224, CLIP_MEAN, CLIP_STD, None, _clip, _load_clip),
        MetricNetSpec("effnet", "efficientnet_b1-c27df63c.pth", _TV + "efficientnet_b1-c27df63c.pth", "30 MB",
                      255, IMAGENET_MEAN, IMAGENET_STD, "avgpool", _effnet, _load_torchvision),
        MetricNetSpec("swav", "swav_800ep_pretrain.pth.tar",
                      "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar", "~110 MB",
                      224, IMAGENET_MEAN, IMAGENET_STD, "avgpool", _swav, _load_swav),
    )
}  # fmt: skip


def resolve_weights(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of the weight file of metric network ``name``; a BrainITError naming it when it is missing."""
    spec = METRIC_NETS[name]
    folder = weights_folder(weights_dir)
    path = folder / spec.filename
    if not path.is_file():
        raise BrainITError(
            f"metric network {name!r} needs the weight file {spec.filename}, which is not in {folder} "
            f"(set --weights-dir or ${WEIGHTS_ENV}); download it from {spec.url} (see data/README.md), "
            "or use the tiny random twins (--nets tiny) for a smoke test"
        )
    return path


def build_bare_metric_net(name: str, *, tiny: bool = False, seed: int = 0) -> nn.Module:
    """The bare, randomly initialised network ``name`` (seeded); its state dict is the weight-file format.

    Tests save a tiny twin's state dict with this and read it back through :func:`build_metric_net`.
    """
    if name not in METRIC_NETS:
        raise BrainITError(f"unknown metric network {name!r}; expected one of {', '.join(METRIC_NETS)}")
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        return METRIC_NETS[name].build(tiny)


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
        protocol: ``"mindeye2"`` or ``"braindiffuser"`` (input resize).
        tiny: build the tiny twin (small, seeded, random unless ``weights`` is given).
        weights: a weight file to load. For a real network the default is its standard file in the weights
            folder; for a tiny twin the default is no file.
        weights_dir: the weights folder (default ``$BRAINIT_WEIGHTS`` or ``~/.cache/brainit-pl/weights``).
        random_init: real architecture with random weights, nothing loaded (benchmarks).
        seed: seed of the random initialisation (tiny twins and ``random_init``).

    Returns:
        A :class:`MetricNet` mapping (B, 3, H, W) images in [0, 1] to (B, D) features.

    Raises:
        BrainITError: unknown name, missing or unreadable weight file.
    """
    if name not in METRIC_NETS:
        raise BrainITError(f"unknown metric network {name!r}; expected one of {', '.join(METRIC_NETS)}")
    spec = METRIC_NETS[name]
    path: Path | None = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BrainITError(f"weight file {path} for metric network {name!r} does not exist")
    elif not tiny and not random_init:
        path = resolve_weights(name, weights_dir)  # fail before the slow build
    net = build_bare_metric_net(name, tiny=tiny, seed=seed)
    if path is not None:
        spec.load(net, path)
    net.eval()
    body: nn.Module
    if spec.node is not None:
        from torchvision.models.feature_extraction import create_feature_extractor

        # Inception's aux head makes its train and eval graphs differ; only the eval graph is used.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            body = create_feature_extractor(net, return_nodes=[spec.node])
    else:
        body = _ClipImageEncoder(net)
    return MetricNet(name, body, spec.input_size, spec.mean, spec.std, protocol=protocol, node=spec.node)
