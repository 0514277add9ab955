"""PixCorr and SSIM against plain numpy / skimage re-implementations of the two published evaluators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision import transforms

from brainit_pl.errors import BrainITError
from brainit_pl.metrics import SSIM, InvalidInputError, PixCorr, check_images
from brainit_pl.metrics.protocols import get_protocol

TOL = 1e-6  # the bound; the torch code reaches ~1e-12


def _pairs(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated float pairs with unequal, non-square sizes (recon 37x45, gt 52x41)."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, 52, 41, generator=g)
    noise = torch.rand(n, 3, 37, 45, generator=g)
    recons = (0.6 * transforms.Resize((37, 45))(gt) + 0.4 * noise).clamp(0, 1)
    return recons, gt


def _mindeye2_425(images: torch.Tensor) -> np.ndarray:
    """MindEye2's notebook: Resize((256, 256)) then Resize(425), on float tensors → (N, 3, 425, 425)."""
    images = transforms.Resize((256, 256), antialias=True)(images).float()
    return transforms.Resize(425, interpolation=transforms.InterpolationMode.BILINEAR)(images).numpy()


def _reference_scores(rec425: np.ndarray, gt425: np.ndarray) -> tuple[float, float]:
    """np.corrcoef per pair over all RGB pixels; skimage rgb2gray + structural_similarity (float64)."""
    pix, ssim = [], []
    for r, g in zip(rec425.astype(np.float64), gt425.astype(np.float64)):
        pix.append(np.corrcoef(g.reshape(-1), r.reshape(-1))[0, 1])
        r_gray, g_gray = rgb2gray(r.transpose(1, 2, 0)), rgb2gray(g.transpose(1, 2, 0))
        ssim.append(
            structural_similarity(
                r_gray, g_gray, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
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


def test_braindiffuser_pixel_metrics_equal_its_pil_pipeline():
    g = torch.Generator().manual_seed(1)
    gt = (torch.rand(4, 3, 425, 425, generator=g) * 255).to(torch.uint8)  # NSD stimuli are 425²
    recons = (torch.rand(4, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    recons[:, 0] = transforms.Resize((64, 64))(gt[:, 0:1])[:, 0]  # correlate the red channel
    rec425, gt425 = [], []
    for r, t in zip(recons, gt):  # evaluate_reconstruction.py: Image.open(...).resize((425, 425)) / 255
        rec425.append(np.array(Image.fromarray(r.permute(1, 2, 0).numpy()).resize((425, 425))) / 255.0)
        gt425.append(t.permute(1, 2, 0).numpy() / 255.0)
    ref_pix, ref_ssim = _reference_scores(
        np.stack(rec425).transpose(0, 3, 1, 2), np.stack(gt425).transpose(0, 3, 1, 2)
    )
    pix, ssim = PixCorr("braindiffuser"), SSIM("braindiffuser")
    pix.update(recons=recons, gt=gt)
    ssim.update(recons=recons, gt=gt)
    assert abs(pix.compute().item() - ref_pix) < TOL
    assert abs(ssim.compute().item() - ref_ssim) < TOL


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


def test_mindeye2_resizes_like_torchvision():
    images = torch.rand(2, 3, 300, 280)
    expected = transforms.Resize(342)(transforms.Resize((256, 256))(images))
    assert torch.equal(get_protocol("mindeye2").net_input(images, 342), expected)


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
