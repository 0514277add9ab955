"""Pretrained weight files: where they live, reading them, and loading them strictly into a network.

Every pretrained network brainit-pl uses comes from a local file; nothing is downloaded at run time.
A file is found from an explicit path, or by its fixed name under the weights folder: the ``weights_dir``
argument, else the environment variable ``BRAINIT_WEIGHTS``, else ``~/.cache/brainit-pl/weights``; failing
that, where the usual downloaders keep it (:func:`find_weights`): the Hugging Face cache
(``huggingface-cli download``; ``HF_HUB_CACHE``, looked up offline) for a file hosted there, torch hub's
checkpoint folder (``torch.hub.get_dir()/checkpoints``, ``TORCH_HOME``) for any other URL.
``brainit-pl weights`` lists them all, present or missing, with the command that fetches each.
:data:`WEIGHT_FILES` lists each file with its source and size (``data/README.md`` lists the same): the
training backbones' and the metric networks' alike, all found, read (:func:`read_state_dict`) and checked
(:func:`load_checked`) by the same code.

Architectures are built on the ``meta`` device and filled from the file with ``assign=True``
(:func:`load_checked`), so a 2.5B-parameter CLIP costs no random initialisation and no second copy in
memory. The loaded network is then wrapped in a :class:`~brainit_pl.backbones.frozen.FrozenBackbone`.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from brainit_pl.errors import BrainITError, require
from brainit_pl.files import load_checkpoint

log = logging.getLogger(__name__)

WEIGHTS_ENV = "BRAINIT_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/brainit-pl/weights")


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file brainit-pl reads.

    Attributes:
        path: where it goes, relative to the weights folder.
        url: where to download it from.
        size: its size, as the source lists it.
        what: what it is, for messages.
        used_by: which configs and commands read it (``brainit-pl weights`` lists it).
    """

    path: str
    url: str
    size: str
    what: str
    used_by: str = ""

    @property
    def hub(self) -> tuple[str, str, str] | None:
        """``(repo_id, filename, repo_type)`` when the file is hosted on the Hugging Face Hub, else ``None``."""
        found = _HF_URL.match(self.url)
        if found is None:
            return None
        kind, repo, filename = found.groups()
        return repo, filename, "dataset" if kind == "datasets/" else "model"

    def fetch_command(self) -> str:
        """The shell command that downloads the file where :func:`find_weights` looks for it."""
        if self.hub is not None:
            repo, filename, repo_type = self.hub
            kind = " --repo-type dataset" if repo_type == "dataset" else ""
            return f"huggingface-cli download{kind} {repo} {filename}"
        return f"wget -P {_torch_hub_checkpoints()} {self.url}"


_HF_URL = re.compile(r"https://huggingface\.co/(datasets/)?([^/]+/[^/]+)/resolve/main/(.+)")
_TORCHVISION = "https://download.pytorch.org/models/"
_METRICS = "brainit-pl evaluate / test / reconstruct --nets real (the {} column)"
WEIGHT_FILES: dict[str, WeightFile] = {
    "clip-vit-bigg-14": WeightFile(
        path="CLIP-ViT-bigG-14-laion2B-39B-b160k/open_clip_pytorch_model.bin",
        url="https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k/resolve/main/open_clip_pytorch_model.bin",
        size="10.2 GB",
        what="OpenCLIP ViT-bigG-14 laion2b_s39b_b160k checkpoint",
        used_by="extract-features: the CLIP token cache configs/subj01.yaml trains on",
    ),
    "vgg16-bn": WeightFile(
        path="vgg16_bn-6c64b313.pth",
        url="https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
        size="528 MiB",
        what="torchvision VGG16-BN ImageNet weights (VGG16_BN_Weights.IMAGENET1K_V1)",
        used_by="configs/subj01_lowlevel.yaml: the low-level BIT's VGG targets",
    ),
    "dinov2-vitl14-reg": WeightFile(
        path="vit_large_patch14_reg4_dinov2.lvd142m/model.safetensors",
        url="https://huggingface.co/timm/vit_large_patch14_reg4_dinov2.lvd142m/resolve/main/model.safetensors",
        size="1.22 GB",
        what="DINOv2 ViT-L/14 with 4 registers (timm vit_large_patch14_reg4_dinov2.lvd142m)",
        used_by="configs/encoder.yaml (the Universal Encoder)",
    ),
    # MindEye2's SDXL-unCLIP (brainit_pl.models.unclip): an sgm DiffusionEngine state dict, UNet + SDXL VAE.
    "mindeye2-unclip6": WeightFile(
        path="unclip6_epoch0_step110000.ckpt",
        url="https://huggingface.co/datasets/pscotti/mindeyev2/resolve/main/unclip6_epoch0_step110000.ckpt",
        size="10+ GB",
        what="MindEye2 SDXL-unCLIP checkpoint (sgm DiffusionEngine, unclip6_epoch0_step110000.ckpt)",
        used_by="configs/stage2_subj01.yaml, configs/test_subj01.yaml (unCLIP sampling)",
    ),
    # SDXL base for the optional img2img refinement (brainit_pl.recon.refine): an sgm-layout single file; it
    # also needs the repo's diffusers config folder (JSON + tokenizer files only), see recon/refine.py.
    "sdxl-base": WeightFile(
        path="sd_xl_base_1.0.safetensors",
        url="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
        size="6.94 GB",
        what="SDXL base 1.0 single-file checkpoint (stabilityai/stable-diffusion-xl-base-1.0)",
        used_by="configs/test_subj01.yaml refine / reconstruct --refine (optional)",
    ),
    # The metric networks' files (brainit_pl.metrics.nets), under their download names.
    "alexnet": WeightFile(
        path="alexnet-owt-7be5be79.pth",
        url=_TORCHVISION + "alexnet-owt-7be5be79.pth",
        size="233 MB",
        what="torchvision AlexNet ImageNet weights (AlexNet_Weights.IMAGENET1K_V1)",
        used_by=_METRICS.format("Alex(2), Alex(5)"),
    ),
    "inception-v3": WeightFile(
        path="inception_v3_google-0cc3c7bd.pth",
        url=_TORCHVISION + "inception_v3_google-0cc3c7bd.pth",
        size="104 MB",
        what="torchvision Inception v3 ImageNet weights (Inception_V3_Weights.IMAGENET1K_V1)",
        used_by=_METRICS.format("Incep"),
    ),
    "efficientnet-b1": WeightFile(
        path="efficientnet_b1-c27df63c.pth",
        url=_TORCHVISION + "efficientnet_b1-c27df63c.pth",
        size="30 MB",
        what="torchvision EfficientNet-B1 ImageNet weights (EfficientNet_B1_Weights.IMAGENET1K_V2)",
        used_by=_METRICS.format("Eff, mindeye2 protocol"),
    ),
    # Brain-Diffuser's efficientnet_b1(weights=True) means IMAGENET1K_V1 (torchvision's legacy "pretrained"
    # default). Its torchvision 0.13.1 downloaded this file as efficientnet_b1_rwightman-533bc792.pth;
    # torchvision 0.17 renamed it after the hash in its name (pytorch/vision#8036), same content.
    "efficientnet-b1-v1": WeightFile(
        path="efficientnet_b1_rwightman-bac287d4.pth",
        url=_TORCHVISION + "efficientnet_b1_rwightman-bac287d4.pth",
        size="30 MB",
        what="torchvision EfficientNet-B1 ImageNet weights ported from timm (EfficientNet_B1_Weights.IMAGENET1K_V1)",
        used_by=_METRICS.format("Eff, braindiffuser protocol"),
    ),
    "swav-rn50": WeightFile(
        path="swav_800ep_pretrain.pth.tar",
        url="https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        size="~110 MB",
        what="SwAV ResNet-50 800-epoch checkpoint (facebookresearch/swav)",
        used_by=_METRICS.format("SwAV"),
    ),
    "openai-clip-vit-l-14": WeightFile(
        path="ViT-L-14.pt",
        url="https://openaipublic.azureedge.net/clip/models/"
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        size="890 MB",
        what="OpenAI CLIP ViT-L/14 TorchScript archive",
        used_by=_METRICS.format("CLIP"),
    ),
}


def weights_folder(weights_dir: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``weights_dir`` if given, else ``$BRAINIT_WEIGHTS``, else ``~/.cache/brainit-pl/weights``."""
    chosen = weights_dir or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR
    return Path(chosen).expanduser()


def _torch_hub_checkpoints() -> Path:
    """torch hub's download folder (``torch.hub.get_dir()/checkpoints``; ``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _in_hf_cache(spec: WeightFile) -> Path | None:
    """The file in the Hugging Face cache (``HF_HUB_CACHE``), looked up offline; ``None`` if absent."""
    if spec.hub is None:
        return None
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # huggingface_hub is optional: no cache to look in
        return None
    repo, filename, repo_type = spec.hub
    # the variable is read now: huggingface_hub read it at import, and it may have been set since
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    found = try_to_load_from_cache(repo, filename, cache_dir=cache, repo_type=repo_type)
    return Path(found) if isinstance(found, str) else None


def find_weights(key: str, weights_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """Where :data:`WEIGHT_FILES` ``[key]`` is on this machine, without touching the network.

    Looks in the weights folder (:func:`weights_folder`), then the Hugging Face cache (files hosted there),
    then torch hub's checkpoint folder (files downloaded by URL).

    Returns:
        ``(path, where)`` with ``where`` one of ``"weights folder"``, ``"hugging face cache"``,
        ``"torch hub"``; ``None`` when it is in none of them.
    """
    spec = WEIGHT_FILES[key]
    candidates = (
        ("weights folder", weights_folder(weights_dir) / spec.path),
        ("hugging face cache", _in_hf_cache(spec)),
        ("torch hub", _torch_hub_checkpoints() / Path(spec.url).name),
    )
    for where, path in candidates:
        if path is not None and path.exists():
            return path, where
    return None


def resolve_weights(
    key: str, path: str | os.PathLike | None = None, *, weights_dir: str | os.PathLike | None = None
) -> Path:
    """Find the local file of :data:`WEIGHT_FILES` ``[key]``.

    Args:
        key: which file (a key of :data:`WEIGHT_FILES`).
        path: an explicit file (or folder) to use instead of :func:`find_weights`'s.
        weights_dir: the weights folder (see :func:`weights_folder`); ignored when ``path`` is given.

    Returns:
        The existing path.

    Raises:
        BrainITError: the file is missing; the message names it, its source URL and size, and the
            command that fetches it.
    """
    spec = WEIGHT_FILES[key]
    source = f"{spec.what}, {spec.size}, from {spec.url}; see data/README.md"
    if path is not None:
        found = Path(path).expanduser()
        require(found.exists(), f"weight file not found: {found} (expected the {source})")
        return found
    located = find_weights(key, weights_dir)
    expected = weights_folder(weights_dir) / spec.path
    require(
        located is not None,
        f"missing weight file {expected} ({source}): download it to that path, or set {WEIGHTS_ENV} to the "
        f"folder that holds {spec.path}, or pass the file's path, or fetch it with "
        f"`{spec.fetch_command()}` (`brainit-pl weights` lists every file)",
    )
    if located[1] != "weights folder":
        log.info("%s: %s from the %s", key, located[0], located[1])
    return located[0]


def read_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, Tensor]:
    """Read the tensors of a weights file whose names start with ``prefix`` (the prefix is removed).

    Reads ``.safetensors`` lazily (only the wanted tensors) and torch pickles memory-mapped, so pulling
    the vision tower out of a 10 GB CLIP checkpoint does not load its text tower. Unwraps a top-level
    ``state_dict``/``model`` entry and a DataParallel ``module.`` prefix, as the upstream loaders do.
    A TorchScript archive (OpenAI's CLIP ``.pt`` files) is told from a pickle by its content and read
    with ``torch.jit.load``; pickles are read by :func:`brainit_pl.files.load_checkpoint` (``weights_only``),
    so no pickle can run Python code.

    Args:
        path: a ``.safetensors`` file, a ``torch.save`` file (``.pth``, ``.bin``, ``.pt``, ``.pth.tar``)
            or a TorchScript archive.
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


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive: a zip holding ``constants.pkl`` (a ``torch.save`` zip has none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("constants.pkl") for entry in archive.namelist())


def _torch_load(path: Path) -> dict[str, Tensor]:
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI ships CLIP that way
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
        # detach: a scripted module's parameters require grad, and the file is only data here
        obj = {k: v.detach() for k, v in scripted.state_dict().items()}
    else:
        try:  # mmap needs the zip format (torch >= 1.6); older files are read whole
            obj = load_checkpoint(path, mmap=True)
        except RuntimeError:
            obj = load_checkpoint(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    require(isinstance(obj, Mapping), f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checked(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str | os.PathLike,
    arch: str,
    may_miss: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module`` (built on any device, ``meta`` included) after checking every key.

    The file's tensors replace the module's (``assign=True``: no copy), cast to the module's dtype as
    ``load_state_dict`` would (OpenAI's CLIP file is float16; the module stays float32). A file's copy of
    a non-persistent buffer (TorchScript files keep CLIP's causal mask) is ignored: the module rebuilds it.

    Args:
        module: the architecture.
        state: tensors by name, e.g. from :func:`read_state_dict`.
        source: the file, for messages.
        arch: the architecture's name, for messages.
        may_miss: key prefixes the file may lack; those tensors keep the module's values (SwAV's file has
            no classifier, ``fc.``). The module must then not be on the ``meta`` device.

    Raises:
        BrainITError: keys or shapes differ; the message lists a few expected and found keys.
    """
    expected = module.state_dict()
    transient = {name for name, _ in module.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in transient}
    # BatchNorm files saved before PyTorch 0.4.1 (torchvision's VGG16-BN among them) lack the batch
    # counter; BatchNorm's own loader fills it in, so its absence is not a mismatch.
    missing = [
        k
        for k in expected
        if k not in state and not k.endswith("num_batches_tracked") and not k.startswith(may_miss)
    ]
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
    state = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=False, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer that no file holds would stay unallocated: a bug in the builder, not user input
        raise RuntimeError(f"{arch}: tensors left on the meta device after loading {source}: {left[:3]}")
