"""The encoder's LoRA adapters on DINOv2 against vectors recorded from the authors' ``Encoder``
(``tests/data/encoder_adapter_reference.npz``, float64).

Their encoder wraps Meta's DINOv2 (tiny here: width 32, 3 blocks, 4 heads, 4 registers, a 5×5 position
grid interpolated to the 4×4 patches of 56² inputs) and adds LoRA to each block's output. Meta's weights
are read through timm's converter (``build_dinov2``'s path for Meta files) into a timm model made for 56²;
the encoder is built with ``adapter="lora"``, rank 7, alpha 0.01, taps [1, 3].
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainit_pl.backbones.dinov2 import DINOv2Tokens, _timm_format
from brainit_pl.models.encoder import UniversalEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

REF = Path(__file__).parent / "data" / "encoder_adapter_reference.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(REF) as z:
        return {k: z[k] for k in z.files}


def t(a):
    return torch.from_numpy(np.array(a))


def weights(ref, prefix="adapter/weights/"):
    return {k[len(prefix) :]: t(v) for k, v in ref.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def config(ref):
    return json.loads(str(ref["adapter/config"]))


def build(ref, config, lora_scale=None):
    """Their Encoder's weights in ours: DINOv2 (Meta's names) via timm's converter, LoRA, projections, readout."""
    import timm

    cfg, state = config["dinov2"], weights(ref)
    side = ref["adapter/x"].shape[-1]
    net = timm.create_model(
        "vit_large_patch14_reg4_dinov2",
        pretrained=False,
        img_size=side,
        num_classes=0,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
    ).double()
    meta = {k[len("embed_model.") :]: v for k, v in state.items() if k.startswith("embed_model.")}
    # Meta's interpolate_pos_encoding runs in float32, the CLS entry included (it is cast back after).
    meta["pos_embed"] = meta["pos_embed"].clone()
    meta["pos_embed"][:, 0] = meta["pos_embed"][:, 0].float().double()
    net.load_state_dict(_timm_format(meta, net, Path("reference")), strict=True)
    backbone = DINOv2Tokens(net, name="reference", layers=config["select_layers"])
    backbone.preprocess = lambda images: images  # their get_features takes the images as they are
    encoder = UniversalEncoder(
        {1: config["num_voxels"]},
        backbone=backbone,
        token_dim=config["inner_ch"],
        embed_dim=config["embed_dim_vox"],
        adapter="lora",
        adapter_rank=config["r"],
        adapter_scale=config["alpha"],
        dropout=0.0,
    ).double()
    ours = {}
    for i in range(len(encoder.adapters)):
        ours[f"adapters.{i}.down.weight"] = state[f"lora_B.{i}.weight"]  # their lora_B is the down-projection
        ours[f"adapters.{i}.up.weight"] = state[f"lora_A.{i}.weight"]
    for i in range(len(config["select_layers"])):
        for part in ("weight", "bias"):
            ours[f"project.{i}.0.{part}"] = state[f"norm_in.{i}.{part}"]
            ours[f"project.{i}.1.{part}"] = state[f"in_project.{i}.{part}"]
    for key, value in state.items():
        if key.startswith(("voxel_embed", "feat_embed", "pos_embed", "map_att.", "norm.", "mlp.")):
            ours[f"readout.{key}"] = value
    ours["voxel_embed.weight"] = state["voxel_embed"]
    encoder.load_state_dict(ours, strict=True)
    if lora_scale is not None:
        for adapter in encoder.adapters:
            adapter.scale = lora_scale
    return encoder.eval()


TOL = 1e-10


def test_lora_defaults_are_the_authors(config):
    from brainit_pl.models.encoder import LoRAAdapter

    torch.manual_seed(0)
    lora = LoRAAdapter(32)
    assert (
        lora.scale == pytest.approx(config["lora_scale"]) and lora.down.bias is None and lora.up.bias is None
    )
    assert lora.down.weight.abs().sum() == 0 and lora.up.weight.abs().sum() > 0  # the identity at init
    bound = 1 / 7**0.5  # kaiming_uniform(a=√5) on fan_in 7
    assert lora.up.weight.abs().max() <= bound and lora.up.weight.abs().max() > 0.8 * bound


@torch.no_grad()
def test_tokens_before_the_blocks(ref, config):
    net = build(ref, config).backbone.net
    x = t(ref["adapter/x"])
    tokens = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    torch.testing.assert_close(tokens, t(ref["adapter/tokens0"]), rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["a", "b"])
@torch.no_grad()
def test_adapted_blocks_taps_features_and_output(ref, config, case):
    encoder = build(ref, config, lora_scale=None if case == "a" else 1.0)
    x, ids = t(ref["adapter/x"]), t(ref["adapter/voxel_ids"])
    net, adapters = encoder.backbone.net, encoder.adapters
    h = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    for i, block in enumerate(net.blocks):  # block by block: each output, and its adapter's branch
        h = block(h)
        torch.testing.assert_close(h, t(ref[f"adapter/{case}/block_out"][:, i]), rtol=0, atol=TOL)
        branch = adapters[i].up(adapters[i].down(h))
        torch.testing.assert_close(branch, t(ref[f"adapter/{case}/lora_out"][:, i]), rtol=0, atol=TOL)
        h = h + adapters[i](h)
    tapped = encoder.backbone(x, adapters=adapters)
    torch.testing.assert_close(tapped, t(ref[f"adapter/{case}/tapped_tokens"]), rtol=0, atol=TOL)
    torch.testing.assert_close(encoder.tokens(x), t(ref[f"adapter/{case}/features"]), rtol=0, atol=TOL)
    torch.testing.assert_close(encoder(x, ids), t(ref[f"adapter/{case}/out"]), rtol=0, atol=TOL)


@torch.no_grad()
def test_zero_down_projection_is_the_identity(ref, config):
    encoder = build(ref, config)
    x, ids = t(ref["adapter/x"]), t(ref["adapter/voxel_ids"])
    for adapter in encoder.adapters:
        adapter.down.weight.zero_()
    out = encoder(x, ids)
    torch.testing.assert_close(out, t(ref["adapter/out_lora_B_zero"]), rtol=0, atol=TOL)
    assert (out - t(ref["adapter/a/out"])).abs().max() > 0.01  # case a's adapters do matter
