"""The metric feature networks: tiny twins, the weight-file loading path, preprocessing, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from brainit_pl.backbones import WEIGHTS_ENV, resolve_weights, weights_folder
from brainit_pl.errors import BrainITError
from brainit_pl.metrics.nets import METRIC_NETS, build_bare_metric_net, build_metric_net

NAMES = tuple(METRIC_NETS)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 30, 26, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("protocol", ["mindeye2", "braindiffuser"])
@pytest.mark.parametrize("name", NAMES)
def test_tiny_twin_gives_one_flat_feature_per_image(name, protocol, images):
    net = build_metric_net(name, tiny=True, protocol=protocol)
    features = net(images)
    assert features.ndim == 2 and features.shape[0] == 3 and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    frozen = list(net.body.parameters())  # the network lives outside net's module tree (FrozenBackbone)
    assert frozen and not any(p.requires_grad for p in frozen)
    net.train()
    assert not net.training  # frozen in eval mode whatever the caller does
    assert torch.equal(net(images), features)  # deterministic


@pytest.mark.parametrize("name", NAMES)
def test_tiny_twin_loads_through_the_real_loading_code(name, images, tmp_path):
    donor = build_bare_metric_net(name, tiny=True, seed=123)
    path = tmp_path / METRIC_NETS[name].filename
    torch.save(donor.state_dict(), path)
    seeded = build_metric_net(name, tiny=True, seed=0)
    loaded = build_metric_net(name, tiny=True, weights=path)  # random seed 0, then the file
    expected = build_metric_net(name, tiny=True, seed=123)
    assert torch.equal(loaded(images), expected(images))
    assert not torch.equal(loaded(images), seeded(images))


def test_swav_checkpoint_format_is_understood(images, tmp_path):
    """facebookresearch/swav: "module." prefixes, a projection head and prototypes, no classifier."""
    donor = build_bare_metric_net("swav", tiny=True, seed=7)
    state = {f"module.{k}": v for k, v in donor.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(4, 4)
    state["module.prototypes.weight"] = torch.zeros(3, 4)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(state, path)
    loaded = build_metric_net("swav", weights_dir=tmp_path, tiny=True, weights=path)
    assert torch.equal(loaded(images), build_metric_net("swav", tiny=True, seed=7)(images))


@pytest.mark.filterwarnings("ignore")  # tracing warnings, irrelevant here
def test_clip_loads_a_torchscript_archive_like_openais(images, tmp_path):
    """OpenAI's ViT-L-14.pt is a TorchScript archive, not a pickle; it must load without weights_only=False."""
    donor = build_bare_metric_net("clip", tiny=True, seed=3).eval()
    traced = torch.jit.trace_module(donor, {"encode_image": torch.rand(1, 3, 224, 224)}, check_trace=False)
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(traced, str(path))
    loaded = build_metric_net("clip", tiny=True, weights=path)
    assert torch.equal(loaded(images), build_metric_net("clip", tiny=True, seed=3)(images))


def test_wrong_or_broken_weight_file_is_a_clear_error(tmp_path):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(build_bare_metric_net("swav", tiny=True).state_dict(), path)
    with pytest.raises(BrainITError, match=r"does not hold torchvision AlexNet \(tiny twin\) weights"):
        build_metric_net("alexnet2", tiny=True, weights=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BrainITError, match="cannot read weights file"):
        build_metric_net("alexnet2", tiny=True, weights=path)


@pytest.mark.parametrize("name", NAMES)
def test_missing_real_weight_file_names_file_folder_and_source(name, tmp_path):
    with pytest.raises(BrainITError) as info:
        build_metric_net(name, weights_dir=tmp_path)
    message = str(info.value)
    spec = METRIC_NETS[name]
    assert spec.filename in message and str(tmp_path) in message and spec.url in message
    assert "\n" not in message


def test_weights_folder_comes_from_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env"))
    assert weights_folder() == tmp_path / "env"
    assert weights_folder(tmp_path / "arg") == tmp_path / "arg"
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / METRIC_NETS["effnet"].filename).write_bytes(b"")
    assert (
        resolve_weights(METRIC_NETS["effnet"].weights_key)
        == tmp_path / "env" / METRIC_NETS["effnet"].filename
    )
    monkeypatch.delenv(WEIGHTS_ENV)
    assert weights_folder() == weights_folder("~/.cache/brainit-pl/weights")


def test_unknown_name_and_protocol():
    with pytest.raises(BrainITError, match="unknown metric network"):
        build_metric_net("vgg", tiny=True)
    with pytest.raises(BrainITError, match="unknown evaluation protocol"):
        build_metric_net("clip", tiny=True, protocol="mindeye1")


def test_mindeye2_input_is_torchvision_resize_then_normalize(images):
    net = build_metric_net("inception", tiny=True)
    seen = {}
    net.body.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    net(images)
    expected = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(
        # torchvision 0.16 (MindEye2's pin): the tensor Resize does not antialias by default
        transforms.Resize(342, antialias=False)(transforms.Resize((256, 256), antialias=False)(images))
    )
    assert torch.allclose(seen["x"], expected, atol=1e-6)


def test_braindiffuser_effnet_reads_the_v1_weights(tmp_path):
    """efficientnet_b1(weights=True) is torchvision's legacy pretrained=True: IMAGENET1K_V1."""
    import torchvision

    from brainit_pl.backbones.weights import WEIGHT_FILES

    v1, v2 = WEIGHT_FILES["efficientnet-b1-v1"], WEIGHT_FILES["efficientnet-b1"]
    tv = torchvision.models.EfficientNet_B1_Weights
    assert v1.url == tv.IMAGENET1K_V1.url and v2.url == tv.IMAGENET1K_V2.url
    with pytest.raises(BrainITError, match=v1.path):
        build_metric_net("effnet", protocol="braindiffuser", weights_dir=tmp_path)
    with pytest.raises(BrainITError, match=v2.path):
        build_metric_net("effnet", protocol="mindeye2", weights_dir=tmp_path)
    # V1 and V2 share the architecture: a V1-format file loads into the same network
    donor = build_bare_metric_net("effnet", tiny=True, seed=4)
    torch.save(donor.state_dict(), tmp_path / v1.path)
    net = build_metric_net("effnet", tiny=True, protocol="braindiffuser", weights=tmp_path / v1.path)
    images = torch.rand(2, 3, 30, 26, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        net(images), build_metric_net("effnet", tiny=True, seed=4, protocol="braindiffuser")(images)
    )


def test_braindiffuser_input_is_pil_224_then_normalize(images):
    net = build_metric_net("clip", tiny=True, protocol="braindiffuser")
    seen = {}
    net.body.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    as_uint8 = (images * 255).round().to(torch.uint8)
    net(as_uint8.float() / 255)
    normalize = transforms.Normalize(
        [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    )
    expected = torch.stack(
        [  # eval_extract_features.py: T.functional.resize(pil, (224, 224)), to_tensor, normalize
            normalize(
                transforms.functional.to_tensor(transforms.functional.resize(Image.fromarray(a), (224, 224)))
            )
            for a in as_uint8.permute(0, 2, 3, 1).numpy().astype(np.uint8)
        ]
    )
    assert torch.allclose(seen["x"], expected, atol=1e-6)


def test_building_does_not_touch_the_global_random_state():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    build_metric_net("effnet", tiny=True, seed=99)
    assert torch.equal(torch.rand(1), before)
