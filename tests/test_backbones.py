"""Backbone factories: tiny twins (structure, frozen, seeded, fast), the real file formats, clear errors."""

import importlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from brainit_pl.backbones import vgg as vgg_module
from brainit_pl.backbones.clip import TINY_CONFIG, build_clip
from brainit_pl.backbones.dinov2 import TINY_ARCH, build_dinov2
from brainit_pl.backbones.vgg import build_vgg
from brainit_pl.backbones.weights import WEIGHT_FILES, WEIGHTS_ENV, load_checked, read_state_dict
from brainit_pl.errors import BrainITError

FACTORIES = {
    "clip": lambda seed=0: build_clip(tiny=True, seed=seed),
    "vgg": lambda seed=0: build_vgg(None, tiny=True, seed=seed),
    "dinov2": lambda seed=0: build_dinov2(tiny=True, seed=seed),
}
SIZES = {"clip": 224, "vgg": 112, "dinov2": 224}


def images(name, batch=2, seed=0):
    return torch.rand(batch, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(seed))


def run(backbone, x):
    with torch.no_grad():
        out = backbone(x)
    return torch.cat([m.flatten(1) for m in out], 1) if isinstance(out, list) else out


@pytest.fixture(scope="module")
def twins():
    return {name: make() for name, make in FACTORIES.items()}


# --- the tiny twins -------------------------------------------------------------------------------------


def test_output_structure(twins):
    assert run(twins["clip"], images("clip")).shape == (2, 256, TINY_CONFIG["vision_cfg"]["width"])
    with torch.no_grad():
        maps = twins["vgg"](images("vgg"))
    assert [tuple(m.shape) for m in maps] == [
        (2, 64, 112, 112),
        (2, 128, 56, 56),
        (2, 256, 28, 28),
        (2, 512, 14, 14),
        (2, 512, 7, 7),
    ]
    dino = twins["dinov2"]
    assert run(dino, images("dinov2")).shape == (2, len(TINY_ARCH.layers), 257, dino.width)
    assert (dino.n_tokens, dino.n_registers) == (257, 4)


@pytest.mark.parametrize("name", FACTORIES)
def test_frozen_and_out_of_checkpoints(twins, name):
    backbone = twins[name]
    assert all(not p.requires_grad for p in backbone.net.parameters())
    backbone.train()
    assert not backbone.net.training
    # the network is never part of a model that owns it: no checkpoint keys, nothing to optimise
    owner = nn.Module()
    owner.backbone = backbone
    owner.head = nn.Linear(2, 2)
    assert set(owner.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(owner.parameters())) == 2


@pytest.mark.parametrize("name", FACTORIES)
def test_seeded_and_leaves_global_rng_alone(twins, name):
    state = torch.get_rng_state()
    again, other = FACTORIES[name](seed=0), FACTORIES[name](seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    first, second, third = (b.net.state_dict() for b in (twins[name], again, other))
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert any(not torch.equal(third[k], first[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("name", FACTORIES)
def test_device_and_dtype_moves_reach_the_network(name):
    backbone = FACTORIES[name]().double()
    assert all(p.dtype == torch.float64 for p in backbone.net.parameters())
    assert run(backbone, images(name, batch=1)).dtype == torch.float64


def test_clip_preprocessing_quirk(twins):
    clip = twins["clip"]
    x = images("clip", batch=1)
    mean, std = clip.mean, clip.std
    torch.testing.assert_close(clip.preprocess(x), ((x + 1) / 2 - mean) / std)
    assert clip.preprocess(torch.rand(1, 3, 100, 120)).shape == (1, 3, 224, 224)


def test_vgg_gradients_reach_the_image_only(twins):
    x = images("vgg", batch=1).requires_grad_(True)
    twins["vgg"](x)[2].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in twins["vgg"].net.parameters())


def test_dinov2_matches_timm_intermediates(twins):
    dino = twins["dinov2"]
    x = images("dinov2")
    with torch.no_grad():
        ours = dino(x)
        taps = dino.net.forward_intermediates(
            dino.preprocess(x),
            indices=[i - 1 for i in dino.layers],
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
    want = torch.stack([torch.cat([prefix[:, :1], spatial], 1) for spatial, prefix in taps], 1)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


def test_dinov2_adapters_are_residual_branches(twins):
    dino = twins["dinov2"]
    x = images("dinov2", batch=1)
    zero = nn.ModuleList(nn.Linear(dino.width, dino.width) for _ in range(5))
    for a in zero:
        nn.init.zeros_(a.weight), nn.init.zeros_(a.bias)
    with torch.no_grad():
        torch.testing.assert_close(dino(x, adapters=zero), dino(x), rtol=0, atol=1e-6)
    nn.init.normal_(zero[0].weight, std=0.1)
    out = dino(x, adapters=zero)
    assert not torch.allclose(out, dino(x))
    out.square().mean().backward()
    assert zero[0].weight.grad is not None
    assert all(p.grad is None for p in dino.net.parameters())


def test_dinov2_layers_are_checked():
    with pytest.raises(BrainITError, match=r"increasing block numbers in 1\.\.5, got \(0, 3\)"):
        build_dinov2(tiny=True, layers=(0, 3))


def test_real_architectures_output_structure():
    """The real-size networks, built on the meta device (shapes only: no weights, no compute)."""
    import open_clip

    from brainit_pl.backbones import clip as clip_module
    from brainit_pl.backbones import dinov2 as dinov2_module

    with torch.device("meta"):
        clip = clip_module._wrap(
            clip_module._vision_tower(open_clip.get_model_config("ViT-bigG-14")), "ViT-bigG-14", {}
        )
        dino = dinov2_module.DINOv2Tokens(
            dinov2_module._create(dinov2_module.ARCHS["dinov2_vitl14_reg"]),
            name="real",
            layers=(1, 6, 12, 18, 24),
        )
        x = torch.empty(2, 3, 224, 224)
        assert clip(x).shape == (2, 256, 1664)
        assert dino(x).shape == (2, 5, 257, 1024)


# --- saved in the real file formats, loaded back through the real loading code ---------------------------


def save_clip_folder(clip, folder):
    """The tiny twin as an OpenCLIP local-dir folder (config + full CLIP checkpoint), as on the HF hub."""
    import open_clip

    full = open_clip.CLIP(**TINY_CONFIG)
    full.visual.load_state_dict(clip.net.state_dict())
    folder.mkdir()
    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": list(clip.mean.flatten().tolist())}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(full.state_dict(), folder / "open_clip_model.safetensors")
    return full


def test_clip_round_trip(twins, tmp_path):
    import open_clip

    clip = twins["clip"]
    full = save_clip_folder(clip, tmp_path / "tiny-clip")
    x = images("clip")
    want = run(clip, x)
    for source in (f"local-dir:{tmp_path / 'tiny-clip'}", tmp_path / "tiny-clip"):
        torch.testing.assert_close(run(build_clip(pretrained=source, tiny=True), x), want, rtol=0, atol=0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "tiny.pt")
    torch.testing.assert_close(
        run(build_clip(pretrained=tmp_path / "tiny.pt", tiny=True), x), want, rtol=0, atol=0
    )
    # OpenCLIP's own loader reads the same folder and gives the same tokens: the format is the real one
    upstream = open_clip.create_model(f"local-dir:{tmp_path / 'tiny-clip'}").eval()
    upstream.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = upstream.visual(clip.preprocess(x))
    torch.testing.assert_close(tokens, want, rtol=0, atol=1e-6)


def test_clip_default_folder_is_found(twins, tmp_path, monkeypatch):
    """The default lookup finds the hub folder under $BRAINIT_WEIGHTS; its own config wins, as in local-dir:."""
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    save_clip_folder(twins["clip"], tmp_path / "CLIP-ViT-bigG-14-laion2B-39B-b160k")
    x = images("clip", batch=1)
    torch.testing.assert_close(run(build_clip(), x), run(twins["clip"], x), rtol=0, atol=0)


def test_vgg_round_trip(twins, tmp_path):
    vgg = twins["vgg"]
    # torchvision's file: features.* and classifier.*, and (being from 2017) no BatchNorm counters and the
    # legacy (non-zip) serialisation
    state = {f"features.{k}": v for k, v in vgg.net.state_dict().items() if "num_batches_tracked" not in k}
    state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "vgg16_bn-6c64b313.pth", _use_new_zipfile_serialization=False)  # pre-zip
    x = images("vgg")
    loaded = build_vgg(tmp_path / "vgg16_bn-6c64b313.pth")  # the real architecture reads it
    torch.testing.assert_close(run(loaded, x), run(vgg, x), rtol=0, atol=0)


def test_vgg_keys_are_torchvision_vgg16_bn():
    import torchvision

    with torch.device("meta"):
        reference = torchvision.models.vgg16_bn().state_dict()
        ours = vgg_module._features().state_dict()
    assert {f"features.{k}" for k in ours} == {k for k in reference if k.startswith("features.")}


def test_dinov2_round_trip(twins, tmp_path):
    import timm

    dino = twins["dinov2"]
    save_file(dino.net.state_dict(), tmp_path / "model.safetensors")
    x = images("dinov2")
    loaded = build_dinov2(weights=tmp_path / "model.safetensors", tiny=True)
    torch.testing.assert_close(run(loaded, x), run(dino, x), rtol=0, atol=0)
    # timm's own loader reads the same file: the format is the real one
    upstream = timm.create_model(
        TINY_ARCH.timm_name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors")},
        img_size=224,
        num_classes=0,
        **TINY_ARCH.overrides,
    )
    torch.testing.assert_close(upstream.state_dict(), dino.net.state_dict(), rtol=0, atol=0)


def test_dinov2_reads_meta_files_at_the_pretraining_grid(tmp_path):
    """Meta's .pth layout at 518² (37×37 positions), as the real files are: converted and resampled to 224²."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = timm.create_model(TINY_ARCH.timm_name, img_size=518, num_classes=0, **TINY_ARCH.overrides)
    timm_state = net.state_dict()
    save_file(timm_state, tmp_path / "model.safetensors")
    meta_state = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta_state["register_tokens"] = timm_state["reg_token"]
    meta_state["cls_token"] = timm_state["cls_token"]  # Meta adds pos_embed[:, 0] to it: zero here
    meta_state["pos_embed"] = torch.cat([torch.zeros(1, 1, net.embed_dim), timm_state["pos_embed"]], 1)
    meta_state["mask_token"] = torch.zeros(1, net.embed_dim)
    torch.save(meta_state, tmp_path / "dinov2_tiny_reg4_pretrain.pth")

    from_timm = build_dinov2(weights=tmp_path / "model.safetensors", tiny=True)
    from_meta = build_dinov2(weights=tmp_path / "dinov2_tiny_reg4_pretrain.pth", tiny=True)
    assert from_meta.net.pos_embed.shape == (1, 256, net.embed_dim)
    x = images("dinov2", batch=1)
    torch.testing.assert_close(run(from_meta, x), run(from_timm, x), rtol=0, atol=1e-6)


# --- errors ------------------------------------------------------------------------------------------------


def test_missing_default_files_name_file_folder_source_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # nor in this machine's download caches
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for build, key in (
        (lambda: build_clip(), "clip-vit-bigg-14"),
        (lambda: build_vgg(), "vgg16-bn"),
        (lambda: build_dinov2(), "dinov2-vitl14-reg"),
    ):
        spec = WEIGHT_FILES[key]
        with pytest.raises(BrainITError) as err:
            build()
        message = str(err.value)
        assert str(tmp_path / spec.path) in message and spec.url in message and spec.size in message
        assert "\n" not in message


def test_missing_explicit_file_is_named(tmp_path):
    with pytest.raises(BrainITError, match=f"weight file not found: {tmp_path / 'nope.pth'}"):
        build_vgg(tmp_path / "nope.pth")
    with pytest.raises(BrainITError, match="no OpenCLIP checkpoint in"):
        (tmp_path / "empty").mkdir()
        build_clip(pretrained=f"local-dir:{tmp_path / 'empty'}", tiny=True)


def test_wrong_architecture_names_expected_and_found_keys(twins, tmp_path):
    save_file(twins["dinov2"].net.state_dict(), tmp_path / "dino.safetensors")
    vgg_file = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in twins["vgg"].net.state_dict().items()}, vgg_file)

    with pytest.raises(
        BrainITError, match=r"holds no weights under 'features\.': found keys like \['blocks\.0"
    ):
        build_vgg(tmp_path / "dino.safetensors")
    with pytest.raises(
        BrainITError, match=r"does not hold DINOv2 tiny .*missing, e\.g\. \['cls_token'.*not expected"
    ):
        build_dinov2(weights=vgg_file, tiny=True)
    # the tiny CLIP checkpoint read as the real ViT-bigG-14: same keys, other shapes
    save_clip_folder(twins["clip"], tmp_path / "tiny-clip")
    with pytest.raises(
        BrainITError,
        match=r"ViT-bigG-14 vision tower.*missing.*class_embedding: expected \(1664,\), found \(32,\)",
    ):
        build_clip(pretrained=tmp_path / "tiny-clip" / "open_clip_model.safetensors")
    # a VGG with extra layers (VGG19-BN has 16 convolutions)
    state = {f"features.{k}": v for k, v in twins["vgg"].net.state_dict().items()}
    state["features.49.weight"] = torch.zeros(512, 512, 3, 3)
    torch.save(state, vgg_file)
    with pytest.raises(BrainITError, match=r"1 keys were not expected, e\.g\. \['49\.weight'\]"):
        build_vgg(vgg_file)


def test_unreadable_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BrainITError, match=f"cannot read weights file {bad}"):
        read_state_dict(bad)


def test_unknown_names(tmp_path):
    with pytest.raises(BrainITError, match="unknown DINOv2 architecture 'dinov3'"):
        build_dinov2("dinov3")
    with pytest.raises(BrainITError, match="no default weights for OpenCLIP 'ViT-B-16'"):
        build_clip("ViT-B-16")
    bogus = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, bogus)
    with pytest.raises(BrainITError, match="unknown OpenCLIP architecture 'ViT-nope'"):
        build_clip("ViT-nope", pretrained=bogus)


# --- one package, one weights path ---------------------------------------------------------------------


def test_package_exports_lazily_and_one_module_loads_no_other():
    import brainit_pl.backbones as backbones

    assert sorted(backbones.__all__) == sorted(backbones._EXPORTS)
    for name, module in backbones._EXPORTS.items():
        assert getattr(backbones, name) is getattr(
            importlib.import_module(f"brainit_pl.backbones.{module}"), name
        )
    with pytest.raises(AttributeError, match="no attribute 'build_nothing'"):
        backbones.build_nothing  # noqa: B018
    others = ("brainit_pl.metrics", "brainit_pl.metrics.nets", "brainit_pl.backbones.clip")
    code = f"import sys, brainit_pl.backbones.vgg; print([m for m in {others!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_load_checked_keeps_the_module_dtype_and_allows_declared_gaps(tmp_path):
    """A float16 file (OpenAI's CLIP) fills a float32 module; only ``may_miss`` keys may be absent."""
    donor = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).half()
    torch.save({k: v for k, v in donor.state_dict().items() if k.startswith("0.")}, tmp_path / "half.pt")
    state = read_state_dict(tmp_path / "half.pt")
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    kept = net[1].weight.detach().clone()
    with pytest.raises(BrainITError, match=r"2 expected keys are missing, e\.g\. \['1\.weight', '1\.bias'\]"):
        load_checked(net, state, source="half.pt", arch="two linears")
    load_checked(net, state, source="half.pt", arch="two linears", may_miss=("1.",))
    assert net[0].weight.dtype == torch.float32 and torch.equal(net[0].weight, donor[0].weight.float())
    assert torch.equal(net[1].weight, kept)
