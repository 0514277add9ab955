"""Pretrained weights: where the files live, reading them, and keeping the networks frozen.

Every pretrained network brainit-pl uses comes from a local file; nothing is downloaded at run time.
A file is found from an explicit path, or by its fixed name under the weights folder: the ``weights_dir``
argument, else the environment variable ``BRAINIT_WEIGHTS``, else ``~/.cache/brainit-pl/weights``.
:data:`WEIGHT_FILES` lists each file with its source and size (``data/README.md`` lists the same).

A network is wrapped in a :class:`FrozenBackbone`: eval mode, no gradients to its weights, and held outside
the module tree so that it never lands in a checkpoint or an optimizer, while ``.to(device)`` and dtype
casts still reach it. Architectures are built on the ``meta`` device and filled from the file with
``assign=True``, so a 2.5B-parameter CLIP costs no random initialisation and no second copy in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)

WEIGHTS_ENV = "BRAINIT_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/brainit-pl/weights")

# torchvision's ImageNet statistics (the VGG16-BN and DINOv2 training normalisation).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file brainit-pl reads.

    Attributes:
        path: where it goes, relative to the weights folder.
        url: where to download it from.
        size: its size, as the source lists it.
        what: what it is, for messages.
    """

    path: str
    url: str
    size: str
    what: str


WEIGHT_FILES: dict[str, WeightFile] = {
    "clip-vit-bigg-14": WeightFile(
        path="CLIP-ViT-bigG-14-laion2B-39B-b160k/open_clip_pytorch_model.bin",
        url="https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k/resolve/main/open_clip_pytorch_model.bin",
        size="10.2 GB",
        what="OpenCLIP ViT-bigG-14 laion2b_s39b_b160k checkpoint",
    ),
    "vgg16-bn": WeightFile(
        path="vgg16_bn-6c64b313.pth",
        url="https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
        size="528 MiB",
        what="torchvision VGG16-BN ImageNet weights (VGG16_BN_Weights.IMAGENET1K_V1)",
    ),
    "dinov2-vitl14-reg": WeightFile(
        path="vit_large_patch14_reg4_dinov2.lvd142m/model.safetensors",
        url="https://huggingface.co/timm/vit_large_patch14_reg4_dinov2.lvd142m/resolve/main/model.safetensors",
        size="1.22 GB",
        what="DINOv2 ViT-L/14 with 4 registers (timm vit_large_patch14_reg4_dinov2.lvd142m)",
    ),
}


def weights_folder(weights_dir: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``weights_dir`` if given, else ``$BRAINIT_WEIGHTS``, else ``~/.cache/brainit-pl/weights``.

    The same rule as :func:`brainit_pl.backbones.metric_nets.weights_folder`.
    """
    chosen = weights_dir or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR
    return Path(chosen).expanduser()


def resolve_weights(
    key: str, path: str | os.PathLike | None = None, *, weights_dir: str | os.PathLike | None = None
) -> Path:
    """Find the local file of :data:`WEIGHT_FILES` ``[key]``.

    Args:
        key: which file (a key of :data:`WEIGHT_FILES`).
        path: an explicit file (or folder) to use instead of the default name in the weights folder.
        weights_dir: the weights folder (see :func:`weights_folder`); ignored when ``path`` is given.

    Returns:
        The existing path.

    Raises:
        BrainITError: the file is missing; the message names it, its source URL and size.
    """
    spec = WEIGHT_FILES[key]
    source = f"{spec.what}, {spec.size}, from {spec.url}; see data/README.md"
    if path is not None:
        found = Path(path).expanduser()
        require(found.exists(), f"weight file not found: {found} (expected the {source})")
        return found
    root = weights_folder(weights_dir)
    found = root / spec.path
    require(
        found.exists(),
        f"missing weight file {found} ({source}): download it to that path, or set {WEIGHTS_ENV} to the "
        f"folder that holds {spec.path}, or pass the file's path",
    )
    return found


def read_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, Tensor]:
    """Read the tensors of a weights file whose names start with ``prefix`` (the prefix is removed).

    Reads ``.safetensors`` lazily (only the wanted tensors) and torch pickles memory-mapped, so pulling
    the vision tower out of a 10 GB CLIP checkpoint does not load its text tower. Unwraps a top-level
    ``state_dict``/``model`` entry and a DataParallel ``module.`` prefix, as the upstream loaders do.

    Args:
        path: a ``.safetensors`` file or a ``torch.save`` file (``.pth``, ``.bin``, ``.pt``).
        prefix: keep only these keys, e.g. ``"visual."``.

    Raises:
        BrainITError: the file cannot be read, or holds no key starting with ``prefix``.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                state = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
        else:
            state = _torch_load(path)
            keys = list(state)
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    except BrainITError:
        raise
    except Exception as err:  # any reader failure is a bad file, reported in one line
        raise BrainITError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    require(
        bool(state),
        f"{path} holds no weights under {prefix!r}: found keys like {keys[:4]} "
        f"({len(keys)} in all); is it the right file?",
    )
    return state


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:  # mmap needs the zip format (torch >= 1.6); older files are read whole
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    require(isinstance(obj, Mapping), f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checked(
    module: nn.Module, state: Mapping[str, Tensor], *, source: str | os.PathLike, arch: str
) -> None:
    """Load ``state`` into ``module`` (built on any device, ``meta`` included) after checking every key.

    Args:
        module: the architecture.
        state: tensors by name, e.g. from :func:`read_state_dict`.
        source: the file, for messages.
        arch: the architecture's name, for messages.

    Raises:
        BrainITError: keys or shapes differ; the message lists a few expected and found keys.
    """
    expected = module.state_dict()
    # BatchNorm files saved before PyTorch 0.4.1 (torchvision's VGG16-BN among them) lack the batch
    # counter; BatchNorm's own loader fills it in, so its absence is not a mismatch.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected keys are missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} keys were not expected, e.g. {unexpected[:3]}")
        if reshaped:
            parts.append(f"{len(reshaped)} keys have other shapes, e.g. {reshaped[:2]}")
        raise BrainITError(f"{source} does not hold {arch} weights: {'; '.join(parts)}")
    module.load_state_dict(dict(state), strict=False, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer that no file holds would stay unallocated: a bug in the builder, not user input
        raise RuntimeError(f"{arch}: tensors left on the meta device after loading {source}: {left[:3]}")


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
