"""VGG tokens and their inverse: the reference vectors, the real-size layout, and the VGGTokens module."""

from pathlib import Path

import numpy as np
import pytest
import torch

from brainit_pl.backbones.vgg import (
    VGGTokens,
    build_vgg,
    vgg_maps_to_tokens,
    vgg_token_layout,
    vgg_tokens_to_maps,
)

REFERENCE = Path(__file__).parent / "data" / "brainit_reference.npz"
REAL_SHAPES = [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as z:
        return {k[len("vgg/") :]: torch.from_numpy(z[k]) for k in z.files if k.startswith("vgg/")}


def test_tokens_match_reference(ref):
    maps = [ref[f"map{i}"] for i in range(1, 6)]
    tokens = vgg_maps_to_tokens(maps)
    for i, t in enumerate(tokens, start=1):
        assert t.shape == ref[f"tokens{i}"].shape
        torch.testing.assert_close(t, ref[f"tokens{i}"], rtol=0, atol=1e-5)


def test_inverse_matches_reference(ref):
    tokens = [ref["tokens1"], ref["noisy_tokens2"], ref["tokens3"], ref["tokens4"], ref["tokens5"]]
    sizes = [tuple(ref[f"map{i}"].shape[-2:]) for i in range(1, 6)]
    maps = vgg_tokens_to_maps(tokens, sizes)
    torch.testing.assert_close(maps[0], ref["inverse1"], rtol=0, atol=1e-5)
    torch.testing.assert_close(maps[1], ref["inverse2"], rtol=0, atol=1e-5)
    # the point-wise scales invert exactly
    for i in (3, 4, 5):
        torch.testing.assert_close(maps[i - 1], ref[f"map{i}"], rtol=0, atol=1e-6)


def test_real_size_layout_is_7190_by_512():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, *shape, generator=gen) for shape in REAL_SHAPES]
    tokens = vgg_maps_to_tokens(maps)
    assert [tuple(t.shape) for t in tokens] == [
        (2, 3136, 512),
        (2, 3025, 512),
        (2, 784, 512),
        (2, 196, 512),
        (2, 49, 512),
    ]
    layout = vgg_token_layout(REAL_SHAPES)
    assert layout.total == 7190 and layout.width == 512
    assert layout.counts == (3136, 3025, 784, 196, 49)
    assert layout.offsets == (0, 3136, 6161, 6945, 7141)
    # exact tokens fold back to the maps they came from, overlaps and duplicates included
    back = vgg_tokens_to_maps(tokens, [s[1:] for s in REAL_SHAPES])
    for m, b in zip(maps, back, strict=True):
        torch.testing.assert_close(b, m, rtol=0, atol=1e-5)


def test_mixed_widths_are_refused():
    with pytest.raises(ValueError, match="several widths"):
        vgg_token_layout([(2, 3, 3)] * 5)


def test_patch_token_layout_by_hand():
    fmap = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)  # (B, C=2, H=3, W=3)
    _, overlapping, *_ = vgg_maps_to_tokens([fmap[:, :, :2, :2], fmap, fmap, fmap, fmap])
    # token (row 0, col 1) of the stride-1 2×2 patches: channel 0's (0,1),(0,2),(1,1),(1,2), then channel 1's
    assert overlapping[0, 1].tolist() == [1, 2, 4, 5, 10, 11, 13, 14]
    assert overlapping.shape == (1, 4, 8)


@pytest.fixture(scope="module")
def vgg_tokens():
    return VGGTokens(build_vgg(None, tiny=True, seed=0))


def test_vgg_tokens_module(vgg_tokens):
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = vgg_tokens(images)
        maps = vgg_tokens.vgg(images)
    assert tokens.shape == (2, 7190, 512)
    assert vgg_tokens.layout.total == 7190
    for got, want in zip(vgg_tokens.layout.split(tokens), vgg_maps_to_tokens(maps), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(vgg_tokens.to_maps(tokens), maps, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert vgg_tokens.state_dict() == {} and list(vgg_tokens.parameters()) == []


def test_vgg_tokens_resize_other_sizes(vgg_tokens):
    images = torch.rand(1, 3, 150, 150, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = vgg_tokens(images)
    assert tokens.shape == (1, 7190, 512)
    assert torch.isfinite(tokens).all()


def test_slim_twin_keeps_the_token_layout():
    import pytest
    import torch

    from brainit_pl.backbones.vgg import VGGTokens, build_vgg
    from brainit_pl.errors import BrainITError

    slim = VGGTokens(build_vgg(tiny=True, slim=8))
    full = VGGTokens(build_vgg(tiny=True))
    assert slim.layout.counts == full.layout.counts and slim.layout.width == 64
    tokens = slim(torch.rand(2, 3, 112, 112))  # (2, 7190, 64)
    assert tokens.shape == (2, 7190, 64)
    maps = slim.to_maps(tokens)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (8, 112, 112),
        (16, 56, 56),
        (32, 28, 28),
        (64, 14, 14),
        (64, 7, 7),
    ]
    with pytest.raises(BrainITError, match="slim VGGs exist only as the tiny random twin"):
        build_vgg("weights.pth", slim=8)


@pytest.mark.parametrize("slim", [1, 8])
def test_twin_carries_image_information_at_every_scale(slim, picture):
    """The twin's deep maps must not be an image-independent constant (issue #4: with PyTorch's default
    init and uncalibrated BatchNorm, relu4_3/relu5_3 differed between images by ~1e-4 of their norm, so the
    low-level loss had nothing to learn at three of its five scales)."""
    twin = VGGTokens(build_vgg(None, tiny=True, slim=slim))
    images = torch.cat([picture(n, 112) for n in ("astronaut", "coffee", "chelsea", "rocket")])
    with torch.no_grad():
        scales = twin.layout.split(twin(images))  # [(4, T_i, D)]
    for i, tokens in enumerate(scales):
        specific = (tokens - tokens.mean(0)).norm(dim=-1).mean()  # how far each image is from the mean image
        assert specific > 0.3 * tokens.norm(dim=-1).mean(), f"scale {i}: the twin's tokens hardly vary"
    again = VGGTokens(build_vgg(None, tiny=True, slim=slim))  # weights and BatchNorm statistics are seeded
    torch.testing.assert_close(again(images[:1]), twin(images[:1]), rtol=0, atol=0)
