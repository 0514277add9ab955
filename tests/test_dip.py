"""The DIP network and the inversion of VGG tokens: architecture, batched = single runs, input checks, and
recovery of real pictures from their tokens through the random VGG16-BN twin."""

import pytest
import torch

from brainit_pl.backbones.vgg import VGGTokens, build_vgg
from brainit_pl.errors import BrainITError
from brainit_pl.metrics.image import pearson_rows, rgb_to_gray, ssim_gray
from brainit_pl.recon.dip import SkipConfig, SkipNet, _feature_losses, invert_vgg_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

SMALL = SkipConfig(channels=8)


@pytest.fixture(scope="module")
def vgg_tokens():
    return VGGTokens(build_vgg(None, tiny=True))


def expected_parameters(c_in: int, c: int, s: int, scales: int, out: int = 3) -> int:
    """Parameters of the skip network as described: per scale a 1×1 skip conv, two 3×3 convs down, a
    BatchNorm of the concatenation, a 3×3 and a 1×1 conv up (each conv with bias and a BatchNorm)."""
    total = 0
    for _ in range(scales):
        total += c_in * s + s + 2 * s  # skip 1×1 + BN
        total += c_in * c * 9 + c + 2 * c + c * c * 9 + c + 2 * c  # down: stride-2 3×3, 3×3
        total += 2 * (s + c)  # BN of the concatenation
        total += (s + c) * c * 9 + c + 2 * c + c * c + c + 2 * c  # up: 3×3, 1×1
        c_in = c
    return total + c * out + out  # 1×1 head


def test_skipnet_matches_the_described_architecture():
    net = SkipNet()  # docs/method.md §6: input depth 32, 3 scales, 128 channels, 2 skip channels
    assert sum(p.numel() for p in net.parameters()) == expected_parameters(32, 128, 2, 3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 9 and all(m.padding_mode == "reflect" for m in convs)
    assert sum(m.stride == (2, 2) for m in convs) == 3
    out = net(torch.rand(1, 32, 64, 48))
    assert out.shape == (1, 3, 64, 48) and 0 < out.min() and out.max() < 1
    with pytest.raises(BrainITError, match="multiples of 8"):
        net(torch.rand(1, 32, 60, 64))


def test_stacked_networks_equal_the_single_ones():
    torch.manual_seed(0)
    singles = [SkipNet(SMALL).train() for _ in range(3)]
    batched = SkipNet.stack(singles).train()
    z = torch.rand(3, 32, 32, 40)
    out = batched(z)
    torch.testing.assert_close(out, torch.cat([net(z[i : i + 1]) for i, net in enumerate(singles)]))
    # each network's gradient comes from its own image only
    weights = (torch.arange(3.0) + 1).view(3, 1, 1, 1)
    (out * weights).sum().backward()
    for i, net in enumerate(singles):
        (net(z[i : i + 1]) * weights[i]).sum().backward()
        grad = batched.head.weight.grad[3 * i : 3 * (i + 1)]  # head weights of group i
        torch.testing.assert_close(grad, net.head.weight.grad, rtol=1e-4, atol=1e-5)


def test_batched_inversion_equals_single_runs(vgg_tokens):
    # In float64: in float32 the rounding differs between a grouped and a plain convolution, and Adam turns
    # the rounding noise of gradients that are zero in exact arithmetic (a conv bias before a BatchNorm)
    # into ±lr steps, so float32 runs differ by more than rounding even when the method is exact.
    vgg64 = VGGTokens(build_vgg(None, tiny=True)).double()
    tokens = torch.randn(2, 7190, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(steps=2, lr=1e-2, net=SMALL, image_size=32, progress=False)
    together = invert_vgg_tokens(tokens, vgg64, batch=2, seed=5, **kw)
    alone = invert_vgg_tokens(tokens, vgg64, batch=1, seed=5, **kw)
    second = invert_vgg_tokens(tokens[1:], vgg64, seed=6, **kw)  # image i uses seed + i
    assert together.dtype == torch.float64
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)
    torch.testing.assert_close(together[1:], second, rtol=0, atol=1e-10)
    assert (together[0] - together[1]).abs().max() > 1e-2  # different targets and seeds, different images


def test_inversion_smoke(vgg_tokens, picture):
    """Shape, range, maps as targets, and a few steps already matching each image's own features best."""
    images = torch.cat([picture("astronaut", 64), picture("coffee", 64)])
    with torch.no_grad():
        tokens = vgg_tokens(images)
    kw = dict(steps=30, lr=1e-2, net=SMALL, image_size=64, progress=False)
    recons = invert_vgg_tokens(tokens, vgg_tokens, **kw)
    assert recons.shape == (2, 3, 64, 64) and recons.dtype == torch.float32
    assert 0 <= recons.min() and recons.max() <= 1
    maps = vgg_tokens.to_maps(tokens)
    torch.testing.assert_close(invert_vgg_tokens(maps, vgg_tokens, **kw), recons)
    with torch.no_grad():
        feats = vgg_tokens.vgg(recons)
        own = _feature_losses(feats, maps)  # (2,) each image's targets against its own result
        # ... and against the other image's result (same targets: no bias from the targets' energy)
        swapped = _feature_losses([f.flip(0) for f in feats], maps)
    assert (own < swapped).all(), (own, swapped)


def test_bad_targets_are_one_clear_error(vgg_tokens):
    with pytest.raises(BrainITError, match=r"\(N, 7190, 512\).*\(1, 7000, 512\)"):
        invert_vgg_tokens(torch.zeros(1, 7000, 512), vgg_tokens, steps=1)
    with pytest.raises(BrainITError, match=r"\(N, 7190, 512\)"):
        invert_vgg_tokens(torch.zeros(1, 7190, 256), vgg_tokens, steps=1)
    maps = vgg_tokens.to_maps(torch.zeros(1, 7190, 512))
    with pytest.raises(BrainITError, match="target maps must be 5"):
        invert_vgg_tokens(maps[:4], vgg_tokens, steps=1)
    with pytest.raises(BrainITError, match="target maps"):
        invert_vgg_tokens([maps[0][..., :-1], *maps[1:]], vgg_tokens, steps=1)
    with pytest.raises(BrainITError, match="N = 0"):
        invert_vgg_tokens(torch.zeros(0, 7190, 512), vgg_tokens, steps=1)
    with pytest.raises(BrainITError, match="multiple of 8"):
        invert_vgg_tokens(maps, vgg_tokens, steps=1, image_size=100)


@pytest.mark.slow
def test_inversion_recovers_each_picture(vgg_tokens, picture):
    """Inverting a picture's true tokens (random VGG twin: its features still carry low-level information)
    gives an image closer to that picture than the inversions of the other pictures' tokens are."""
    images = torch.cat([picture(n, 112) for n in ("astronaut", "coffee", "chelsea")])
    with torch.no_grad():
        tokens = vgg_tokens(images)
    # 120 steps at a higher learning rate and a narrower network than the real 1,800 (~45 CPU-s); margins
    # measured with the calibrated twin: PixCorr ≥ 0.51, SSIM ≥ 0.137
    recons = invert_vgg_tokens(
        tokens, vgg_tokens, steps=120, lr=3e-3, net=SkipConfig(channels=16), image_size=112, progress=False
    )
    k = len(images)
    # [i, j]: reconstruction from picture i's tokens against picture j
    pixcorr = torch.stack(
        [pearson_rows(recons[i : i + 1].flatten(1).expand(k, -1), images.flatten(1)) for i in range(k)]
    )
    gray_r, gray_x = rgb_to_gray(recons.double()), rgb_to_gray(images.double())
    ssim = torch.stack([ssim_gray(gray_r[i : i + 1].expand(k, -1, -1, -1), gray_x) for i in range(k)])
    for scores, margin in ((pixcorr, 0.2), (ssim, 0.03)):
        own = scores.diagonal()  # picture j against its own reconstruction...
        others = scores.masked_fill(torch.eye(k, dtype=torch.bool), -1).amax(dim=0)  # ...and the best other
        assert (own > others + margin).all(), scores
