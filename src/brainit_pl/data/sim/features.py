"""Feature maps of the simulated brain: what a voxel's population receptive field pools.

From an image at the feature resolution F (the stimulus downsampled) and its category coverage maps,
compute maps on the pooling grid P = F / 2 (the response model is linear in these maps, so the pRF
pooling of 10k+ images stays a few matrix products):

* ``lum``, ``rg``, ``by``: luminance and the two colour-opponent channels; ``sat``: saturation;
* ``contrast_{lo,mid,hi}``: log contrast energy of quadrature Gabor filters at 3, 6 and 12 cycles per
  image, summed over 4 orientations;
* ``orient_{0,45,90,135}_{lo,mid,hi}``: orientation contrast, the energy at one orientation divided by
  the mean over orientations (divisive normalisation, as in V1), so orientation tuning is not just
  contrast;
* ``edges``: edge density, the local fraction of pixels whose Sobel gradient is strong;
* ``cat_<category>``: the visible coverage of each semantic category (faces, bodies, places, ...).

Each map is divided by a fixed scale (its spread over a calibration set of generated images) so the
weights of a functional type mix comparable quantities. The filters are built here from their
definition (a Gaussian envelope in the Fourier domain) because the FFT lets one batched product filter
all images at once, which scikit-image's per-image ``gabor`` cannot.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import fft, ndimage

from brainit_pl.data.sim.sources import CATEGORIES

ORIENTATIONS = (0, 45, 90, 135)
SCALES = {"lo": 3.0, "mid": 6.0, "hi": 12.0}  # cycles per image
FEATURES: tuple[str, ...] = (
    "lum", "rg", "by", "sat",
    *(f"contrast_{s}" for s in SCALES),
    *(f"orient_{o}_{s}" for s in SCALES for o in ORIENTATIONS),
    "edges",
    *(f"cat_{c}" for c in CATEGORIES),
)  # fmt: skip


@functools.lru_cache(maxsize=4)
def _gabor_bank(size: int) -> np.ndarray:
    """(len(SCALES) * 4, size, size) one-sided Gaussian filters in the Fourier domain (complex Gabors)."""
    fy = fft.fftfreq(size)[:, None] * size  # cycles per image
    fx = fft.fftfreq(size)[None, :] * size
    bank = []
    for f0 in SCALES.values():
        for deg in ORIENTATIONS:
            th = np.deg2rad(deg)
            # a grating at orientation `deg` varies along the direction perpendicular to its bars
            u0, v0 = f0 * np.cos(th), f0 * np.sin(th)
            sigma = f0 * 0.35  # about one octave of bandwidth
            bank.append(np.exp(-((fx - u0) ** 2 + (fy - v0) ** 2) / (2 * sigma**2)))
    return np.asarray(bank, np.float32)


def _pool2(x: np.ndarray) -> np.ndarray:
    """2x2 mean pooling of the last two axes."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def raw_feature_maps(small: np.ndarray, category_maps: np.ndarray) -> np.ndarray:
    """Unscaled feature maps.

    Args:
        small: (N, F, F, 3) float32 images in [0, 1].
        category_maps: (N, len(CATEGORIES), F, F) float32 coverage.

    Returns:
        (N, len(FEATURES), F / 2, F / 2) float32.
    """
    n, size = small.shape[0], small.shape[1]
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    lum = 0.299 * r + 0.587 * g + 0.114 * b  # (N, F, F)
    maps = [lum - 0.5, r - g, b - (r + g) / 2, small.max(-1) - small.min(-1)]
    spec = fft.fft2(lum - lum.mean(axis=(1, 2), keepdims=True), workers=-1)  # (N, F, F)
    bank = _gabor_bank(size)
    energy = np.abs(fft.ifft2(spec[:, None] * bank[None], workers=-1)).astype(np.float32)  # (N, 12, F, F)
    energy = energy.reshape(n, len(SCALES), len(ORIENTATIONS), size, size)
    energy = _pool2(energy)  # (N, 3, 4, P, P): normalise at the pooling grid, a local neighbourhood
    total = energy.mean(axis=2)  # (N, 3, P, P)
    low = [_pool2(m) for m in maps]
    low += [np.log1p(total[:, k] / 0.02) for k in range(len(SCALES))]
    orient = energy / (total[:, :, None] + 1e-3) - 1.0
    low += [orient[:, k, o] for k in range(len(SCALES)) for o in range(len(ORIENTATIONS))]
    # Sobel with (1, 3, 3) kernels: ndimage.sobel would also smooth across the batch axis
    sobel = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], np.float32)[None]
    grad = np.hypot(ndimage.correlate(lum, sobel), ndimage.correlate(lum, sobel.transpose(0, 2, 1)))
    low.append(_pool2((grad > 0.4).astype(np.float32)))
    return np.concatenate([np.stack(low, axis=1), _pool2(category_maps)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=4)
def feature_scales(feature_size: int) -> np.ndarray:
    """(len(FEATURES),) spread of each map over 64 calibration images (a fixed, seed-free stream)."""
    from brainit_pl.data.sim.stimuli import CALIBRATION_STREAM, generate_stimuli

    batch = generate_stimuli(
        np.arange(64),
        seed=0,
        size=max(64, feature_size),
        feature_size=feature_size,
        stream=CALIBRATION_STREAM,
    )
    raw = raw_feature_maps(batch.small, batch.category_maps)
    return np.maximum(raw.std(axis=(0, 2, 3)), 1e-3).astype(np.float32)


def feature_maps(small: np.ndarray, category_maps: np.ndarray) -> np.ndarray:
    """Scaled feature maps (N, len(FEATURES), F / 2, F / 2) float32; see :func:`raw_feature_maps`."""
    raw = raw_feature_maps(small, category_maps)
    return raw / feature_scales(small.shape[1])[None, :, None, None]
