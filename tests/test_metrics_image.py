"""PixCorr and SSIM against plain numpy / skimage re-implementations of the two published evaluators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision import transforms

from brainit_pl.errors import BrainITError
from brainit_pl.metrics import SSIM, InvalidInputError, PixCorr, check_images
from brainit_pl.metrics.protocols import MindEye2Protocol, get_protocol

TOL = 1e-6  # the bound; the torch code reaches ~1e-12


def _pairs(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated float pairs with unequal, non-square sizes (recon 37x45, gt 52x41)."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, 52, 41, generator=g)
    noise = torch.rand(n, 3, 37, 45, generator=g)
    recons = (0.6 * transforms.Resize((37, 45))(gt) + 0.4 * noise).clamp(0, 1)
    return recons, gt


# torchvision 0.16.0 (MindEye2's pin): the tensor Resize's antialias=None resolves to False for tensors.
TV016_ANTIALIAS = False


def _mindeye2_425(images: torch.Tensor, antialias: bool = TV016_ANTIALIAS) -> np.ndarray:
    """MindEye2's notebook: Resize((256, 256)) then Resize(425), on float tensors → (N, 3, 425, 425)."""
    images = transforms.Resize((256, 256), antialias=antialias)(images).float()
    bilinear = transforms.InterpolationMode.BILINEAR
    return transforms.Resize(425, interpolation=bilinear, antialias=antialias)(images).numpy()


def _ssim_skimage_0172_multichannel(im1: np.ndarray, im2: np.ndarray) -> float:
    """scikit-image 0.17.2's structural_similarity(im1, im2, multichannel=True, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1.0) on 2-D arrays, written out: the last axis is
    the channel axis, so each column ``im[..., ch]`` is a 1-D image with its own SSIM; the mean of those."""
    truncate, sigma = 3.5, 1.5
    win_size = 2 * int(truncate * sigma + 0.5) + 1  # 11
    pad = (win_size - 1) // 2
    per_channel = []
    for ch in range(im1.shape[-1]):
        x, y = im1[..., ch].astype(np.float64), im2[..., ch].astype(np.float64)  # 1-D, length H

        def filt(a: np.ndarray) -> np.ndarray:
            return gaussian_filter(a, sigma=sigma, truncate=truncate)  # scipy's default mode="reflect"

        ux, uy = filt(x), filt(y)
        vx, vy, vxy = filt(x * x) - ux * ux, filt(y * y) - uy * uy, filt(x * y) - ux * uy  # cov_norm 1.0
        c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        per_channel.append(s[pad:-pad].mean())  # skimage.util.crop(S, pad) of a 1-D map
    return float(np.mean(per_channel))


def _reference_scores(
    rec425: np.ndarray, gt425: np.ndarray, multichannel_0172: bool = False
) -> tuple[float, float]:
    """np.corrcoef per pair over all RGB pixels; skimage rgb2gray + structural_similarity (float64)."""
    pix, ssim = [], []
    for r, g in zip(rec425.astype(np.float64), gt425.astype(np.float64)):
        pix.append(np.corrcoef(g.reshape(-1), r.reshape(-1))[0, 1])
        r_gray, g_gray = rgb2gray(r.transpose(1, 2, 0)), rgb2gray(g.transpose(1, 2, 0))
        if multichannel_0172:
            ssim.append(_ssim_skimage_0172_multichannel(r_gray, g_gray))
        else:
            ssim.append(
                structural_similarity(
                    r_gray,
                    g_gray,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                    data_range=1.0,
                )
            )
    return float(np.mean(pix)), float(np.mean(ssim))


def test_mindeye2_pixcorr_and_ssim_equal_numpy_and_skimage():
    recons, gt = _pairs()
    ref_pix, ref_ssim = _reference_scores(_mindeye2_425(recons), _mindeye2_425(gt))
    pix, ssim = PixCorr(), SSIM()
    pix.update(recons=recons, gt=gt)
    ssim.update(recons=recons, gt=gt)
    assert abs(pix.compute().item() - ref_pix) < TOL
    assert abs(ssim.compute().item() - ref_ssim) < TOL
    assert 0.2 < ref_ssim < 0.99 and 0.2 < ref_pix < 0.99  # a non-trivial case


def test_mindeye2_antialias_is_an_explicit_option():
    g = torch.Generator().manual_seed(3)  # larger than 256², so that the first resize shrinks
    gt = torch.rand(3, 3, 400, 380, generator=g)
    recons = (0.6 * gt + 0.4 * torch.rand(3, 3, 400, 380, generator=g)).clamp(0, 1)
    ref_pix, ref_ssim = _reference_scores(_mindeye2_425(recons, True), _mindeye2_425(gt, True))
    pix, ssim = PixCorr(MindEye2Protocol(antialias=True)), SSIM(get_protocol("mindeye2", antialias=True))
    pix.update(recons=recons, gt=gt)
    ssim.update(recons=recons, gt=gt)
    assert abs(pix.compute().item() - ref_pix) < TOL
    assert abs(ssim.compute().item() - ref_ssim) < TOL
    default = PixCorr()
    default.update(recons=recons, gt=gt)
    assert abs(default.compute().item() - ref_pix) > 1e-4  # the option changes the numbers


def test_braindiffuser_pixel_metrics_equal_its_pil_pipeline():
    g = torch.Generator().manual_seed(1)
    gt = (torch.rand(4, 3, 425, 425, generator=g) * 255).to(torch.uint8)  # NSD stimuli are 425²
    recons = (torch.rand(4, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    recons[:, 0] = transforms.Resize((64, 64))(gt[:, 0:1])[:, 0]  # correlate the red channel
    rec425, gt425 = [], []
    for r, t in zip(recons, gt):  # evaluate_reconstruction.py: Image.open(...).resize((425, 425)) / 255
        rec425.append(np.array(Image.fromarray(r.permute(1, 2, 0).numpy()).resize((425, 425))) / 255.0)
        gt425.append(t.permute(1, 2, 0).numpy() / 255.0)
    rec425, gt425 = np.stack(rec425).transpose(0, 3, 1, 2), np.stack(gt425).transpose(0, 3, 1, 2)
    ref_pix, ref_ssim = _reference_scores(rec425, gt425, multichannel_0172=True)
    pix, ssim = PixCorr("braindiffuser"), SSIM("braindiffuser")
    pix.update(recons=recons, gt=gt)
    ssim.update(recons=recons, gt=gt)
    assert abs(pix.compute().item() - ref_pix) < TOL
    assert abs(ssim.compute().item() - ref_ssim) < TOL
    _, ssim_2d = _reference_scores(rec425, gt425)
    assert abs(ref_ssim - ssim_2d) > 1e-3  # the column SSIM is not the 2-D one


def test_braindiffuser_ssim_is_the_mean_of_column_ssims():
    """The same thing through today's skimage: the channel axis set to the last (column) axis."""
    g = torch.Generator().manual_seed(2)
    gt = torch.rand(2, 3, 425, 425, generator=g)
    recons = (0.7 * gt + 0.3 * torch.rand(2, 3, 425, 425, generator=g)).clamp(0, 1)
    recons, gt = (recons * 255).round() / 255, (gt * 255).round() / 255  # 8-bit values: PIL leaves them be
    expected = []
    for r, t in zip(recons.double().numpy(), gt.double().numpy()):
        r_gray, t_gray = rgb2gray(r.transpose(1, 2, 0)), rgb2gray(t.transpose(1, 2, 0))
        expected.append(
            structural_similarity(
                r_gray, t_gray, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=1.0,
            )
        )  # fmt: skip
    ssim = SSIM("braindiffuser")
    ssim.update(recons=recons, gt=gt)
    assert ssim.per_image().tolist() == pytest.approx(expected, abs=TOL)


def test_identical_images_score_one():
    _, gt = _pairs(3)
    pix, ssim = PixCorr(), SSIM()
    pix.update(recons=gt, gt=gt)
    ssim.update(recons=gt, gt=gt)
    assert pix.compute().item() == pytest.approx(1.0, abs=1e-12)
    assert ssim.compute().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("metric_cls", [PixCorr, SSIM])
def test_two_updates_equal_one(metric_cls):
    recons, gt = _pairs(7)
    once, twice = metric_cls(), metric_cls()
    once.update(recons=recons, gt=gt)
    twice.update(recons=recons[:3], gt=gt[:3])
    twice.update(recons=recons[3:], gt=gt[3:])
    assert torch.allclose(once.compute(), twice.compute(), rtol=0, atol=1e-12)


def test_uint8_equals_float_over_255():
    recons, gt = _pairs(3)
    r8, g8 = (recons * 255).round().to(torch.uint8), (gt * 255).round().to(torch.uint8)
    a, b = PixCorr(), PixCorr()
    a.update(recons=r8, gt=g8)
    b.update(recons=r8.float() / 255, gt=g8.float() / 255)
    assert a.compute().item() == pytest.approx(b.compute().item(), abs=1e-12)


def test_mindeye2_resizes_like_torchvision_016():
    """Resize((256, 256)) then Resize(S), neither antialiased (torchvision 0.16's tensor default)."""
    images = torch.rand(2, 3, 300, 280)
    for size in (342, 224):
        expected = transforms.Resize(size, antialias=False)(
            transforms.Resize((256, 256), antialias=False)(images)
        )
        assert torch.equal(get_protocol("mindeye2").net_input(images, size), expected)
        smooth = transforms.Resize(size, antialias=True)(
            transforms.Resize((256, 256), antialias=True)(images)
        )
        assert torch.equal(MindEye2Protocol(antialias=True).net_input(images, size), smooth)
        assert not torch.allclose(expected, smooth, atol=1e-3)


def test_protocols_describe_their_version_and_options():
    me2, bd = get_protocol("mindeye2"), get_protocol("braindiffuser")
    assert me2.describe()["protocol_version"] == "2" and me2.options()["antialias"] is False
    assert me2 == MindEye2Protocol() != MindEye2Protocol(antialias=True)
    assert bd.options()["ssim"] == "columns" and bd.weights_key("effnet", "x") == "efficientnet-b1-v1"
    assert me2.weights_key("effnet", "efficientnet-b1") == "efficientnet-b1"
    with pytest.raises(BrainITError, match="does not take"):
        get_protocol("braindiffuser", antialias=True)


@pytest.mark.parametrize(
    ("recons", "gt", "message"),
    [
        (torch.rand(3, 3, 8, 8), torch.rand(4, 3, 8, 8), "different numbers of images"),
        (torch.rand(2, 8, 8, 3), torch.rand(2, 8, 8, 3), "(B, 3, H, W)"),
        (torch.rand(2, 3, 8), torch.rand(2, 3, 8), "(B, 3, H, W)"),
        (torch.rand(2, 3, 8, 8) * 2, torch.rand(2, 3, 8, 8), "outside [0, 1]"),
        (torch.rand(2, 3, 8, 8) - 0.5, torch.rand(2, 3, 8, 8), "outside [0, 1]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.rand(2, 3, 8, 8), "both as uint8"),
        (torch.full((2, 3, 8, 8), float("nan")), torch.rand(2, 3, 8, 8), "NaN"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), torch.zeros(2, 3, 8, 8, dtype=torch.int32), "int32"),
        (np.zeros((2, 3, 8, 8)), torch.rand(2, 3, 8, 8), "torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(recons, gt, message):
    with pytest.raises(
        InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        check_images(recons, gt)
    metric = PixCorr()
    with pytest.raises(ValueError):  # torchmetrics users catch ValueError ...
        metric.update(recons=recons, gt=gt)
    with pytest.raises(BrainITError):  # ... and the CLI turns BrainITError into one line
        metric.update(recons=recons, gt=gt)


def test_half_given_and_nothing_given():
    metric = SSIM()
    metric.update()  # a MetricCollection updated with embeddings only
    with pytest.raises(InvalidInputError, match="no images"):
        metric.compute()
    with pytest.raises(InvalidInputError, match="both"):
        metric.update(recons=torch.rand(1, 3, 8, 8))
