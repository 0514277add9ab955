"""Input checks shared by every image metric, and the two pixel metrics: PixCorr and SSIM.

Both pixel metrics keep one value per image pair (a ``cat`` state, gathered across devices), so that the
mean and a bootstrap interval over images (:mod:`brainit_pl.metrics.bootstrap`) come from the same values.
They are computed in float64 from the protocol's float32 425² images, which is what ``np.corrcoef`` and
skimage do in the reference evaluators.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from brainit_pl.errors import BrainITError
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, Protocol, get_protocol

# skimage.color.rgb2gray (ITU-R BT.709 luma)
GRAY_COEFFS = (0.2125, 0.7154, 0.0721)
# skimage.metrics.structural_similarity with gaussian_weights=True
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's value: an 11-tap window at sigma 1.5, as in Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03


class InvalidInputError(BrainITError, ValueError):
    """Bad metric input. A ValueError for library users, a one-line error for the CLI."""


def check_images(recons: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a batch of reconstructions and ground truths and return both as float32 in [0, 1].

    The two sets may have different resolutions (each protocol resizes both), but must hold the same number
    of images, both as uint8 (0–255) or both as float in [0, 1].

    Args:
        recons: (B, 3, H, W) uint8 or float.
        gt: (B, 3, H', W') of the same kind.

    Returns:
        ``(recons, gt)`` as float32 in [0, 1].

    Raises:
        InvalidInputError: wrong type, shape, count, dtype mix or value range.
    """
    for name, images in (("recons", recons), ("gt", gt)):
        if not isinstance(images, Tensor):
            raise InvalidInputError(
                f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidInputError(
                f"{name} must have shape (B, 3, H, W) (RGB, channels first), got {tuple(images.shape)}"
            )
    if recons.shape[0] != gt.shape[0]:
        raise InvalidInputError(
            f"recons and gt hold different numbers of images ({recons.shape[0]} vs {gt.shape[0]}); "
            "each reconstruction needs its ground-truth image"
        )
    kinds = {
        name: ("uint8" if x.dtype == torch.uint8 else "float" if x.is_floating_point() else str(x.dtype))
        for name, x in (("recons", recons), ("gt", gt))
    }
    for name, kind in kinds.items():
        if kind not in ("uint8", "float"):
            raise InvalidInputError(f"{name} has dtype {kind}; expected uint8 (0-255) or float in [0, 1]")
    if kinds["recons"] != kinds["gt"]:
        raise InvalidInputError(
            f"recons are {recons.dtype} but gt is {gt.dtype}: give both as uint8 (0-255) or both as float in "
            "[0, 1], so that the same scale is compared"
        )
    if kinds["recons"] == "uint8":
        return recons.float() / 255.0, gt.float() / 255.0
    for name, images in (("recons", recons), ("gt", gt)):
        if images.numel() and not torch.isfinite(images).all():
            raise InvalidInputError(f"{name} contains NaN or infinite values")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise InvalidInputError(
                f"{name} has values in [{images.min().item():.4g}, {images.max().item():.4g}], outside [0, 1]; "
                "clamp float images to [0, 1] (or pass uint8 images)"
            )
    return recons.float(), gt.float()


def is_empty(state: list[Tensor] | Tensor) -> bool:
    """True for a ``cat`` state that holds nothing (a list before a sync, a tensor after one)."""
    return state.numel() == 0 if isinstance(state, Tensor) else len(state) == 0


def pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of matching rows, in float64.

    Args:
        x: (B, D).
        y: (B, D).

    Returns:
        (B,) float64; NaN for a constant row, as ``np.corrcoef``.
    """
    x = x.double()
    y = y.double()
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)

    def dot(a: Tensor, b: Tensor) -> Tensor:  # row-wise, without a (B, D) temporary
        return torch.einsum("bd,bd->b", a, b)

    return dot(x, y) / torch.sqrt(dot(x, x) * dot(y, y))


def rgb_to_gray(images: Tensor) -> Tensor:
    """skimage's ``rgb2gray`` on a channels-first batch: (B, 3, H, W) → (B, 1, H, W), same dtype."""
    coeffs = torch.tensor(GRAY_COEFFS, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, coeffs).unsqueeze(1)


def _blur_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, n) matrix M with M @ x = ``scipy.ndimage.gaussian_filter1d(x, 1.5, axis=0, mode="reflect",
    truncate=3.5)`` for x of n rows: the 11-tap gaussian with scipy's half-sample reflection folded in."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # scipy's radius: 5
    if n <= radius:
        raise InvalidInputError(f"SSIM needs images larger than {radius} pixels, got {n}")
    offsets = torch.arange(-radius, radius + 1, device=device)
    kernel = torch.exp(-0.5 * (offsets.to(dtype) / SSIM_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    rows = torch.arange(n, device=device).unsqueeze(1).expand(n, offsets.numel())  # (n, K)
    src = rows + offsets  # (n, K) source sample of each tap
    # scipy "reflect" repeats the edge sample (d c b a | a b c d | d c b a); torch's "reflect" would not.
    src = torch.where(src < 0, -src - 1, src)
    src = torch.where(src >= n, 2 * n - src - 1, src)
    matrix = torch.zeros(n, n, dtype=dtype, device=device)
    return matrix.index_put_((rows, src), kernel.expand(n, -1), accumulate=True)


def _gaussian_blur(maps: Tensor) -> Tensor:
    """Gaussian filter over H and W of each map, as skimage's SSIM applies it.

    Separable, as two matrix products (faster than a float64 convolution on CPU, and exact).

    Args:
        maps: (B, K, H, W) float64.

    Returns:
        (B, K, H, W).
    """
    h, w = maps.shape[-2:]
    return _blur_matrix(h, maps.dtype, maps.device) @ maps @ _blur_matrix(w, maps.dtype, maps.device).T


def ssim_gray(x: Tensor, y: Tensor, data_range: float = 1.0, mode: str = "2d") -> Tensor:
    """Mean SSIM per image, equal to skimage's ``structural_similarity(x, y, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range)`` on 2-D grey images.

    ``mode="2d"`` is that call (MindEye2). ``mode="columns"`` is the same call with ``multichannel=True``
    in scikit-image 0.17.2 (Brain-Diffuser): the last axis of the 2-D image is taken as channels, so each
    column is a 1-D signal, filtered by the 1-D gaussian down the rows, its SSIM map cropped by the radius
    at both ends and averaged; the result is the mean over the columns (all of the same length, hence the
    mean of the row-cropped map).

    Args:
        x: (B, 1, H, W) float64 grey images.
        y: (B, 1, H, W) float64.
        data_range: dynamic range of the images.
        mode: ``"2d"`` or ``"columns"``.

    Returns:
        (B,) float64.
    """
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5, H, W)
    if mode == "2d":
        stats = _gaussian_blur(maps)
    elif mode == "columns":  # filter along H only: each column on its own
        stats = _blur_matrix(maps.shape[-2], maps.dtype, maps.device) @ maps
    else:
        raise ValueError(f"unknown SSIM mode {mode!r}; expected '2d' or 'columns'")
    ux, uy, uxx, uyy, uxy = stats.unbind(dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy  # population covariance (cov_norm = 1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # (B, H, W)
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # skimage crops (win_size - 1) // 2 = the filter radius
    if mode == "columns":
        return s[:, pad:-pad, :].mean(dim=(1, 2))
    return s[:, pad:-pad, pad:-pad].mean(dim=(1, 2))


class _PairMeanMetric(Metric):
    """A mean over image pairs, kept as the per-pair values (``cat``: gathered across devices)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, protocol: str | Protocol = DEFAULT_PROTOCOL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.protocol = get_protocol(protocol)
        self.add_state("pair_values", default=[], dist_reduce_fx="cat")

    def _per_pair(self, recons: Tensor, gt: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, recons: Tensor | None = None, gt: Tensor | None = None) -> None:
        """Add a batch of pairs.

        Args:
            recons: (B, 3, H, W) uint8, or float in [0, 1]. ``None`` (with ``gt`` ``None``) is a no-op, so
                that a :class:`~torchmetrics.MetricCollection` may be updated with embeddings only.
            gt: (B, 3, H', W') ground truths of the same kind.
        """
        if recons is None and gt is None:
            return
        if recons is None or gt is None:
            raise InvalidInputError("give both recons and gt (or neither)")
        recons, gt = check_images(recons, gt)
        self.pair_values.append(self._per_pair(recons, gt).double())  # (B,) float64

    def per_image(self) -> Tensor:
        """(N,) float64: the value of every pair seen, in update order (rank by rank after a sync)."""
        if is_empty(self.pair_values):
            raise InvalidInputError(f"{type(self).__name__}: no images were given")
        return dim_zero_cat(self.pair_values)

    def compute(self) -> Tensor:
        """Mean over all pairs seen (float64 scalar)."""
        return self.per_image().mean()


class PixCorr(_PairMeanMetric):
    """Pixel correlation ↑: Pearson r between all RGB pixels of each pair at 425², averaged over pairs.

    Args:
        protocol: ``"mindeye2"`` or ``"braindiffuser"`` (how images reach 425²).
        **kwargs: :class:`~torchmetrics.Metric` options.
    """

    def _per_pair(self, recons: Tensor, gt: Tensor) -> Tensor:
        x = self.protocol.pixel_input(recons).flatten(1)  # (B, 3·425·425)
        y = self.protocol.pixel_input(gt).flatten(1)
        return pearson_rows(x, y)


class SSIM(_PairMeanMetric):
    """Structural similarity ↑ of the grey images at 425² (skimage semantics), averaged over pairs.

    skimage ``rgb2gray``, then ``structural_similarity`` with a gaussian window (σ 1.5, truncate 3.5,
    reflect borders), population covariance, data range 1, and the mean taken over the image cropped by
    the window radius. Computed in float64 in torch, so it runs on GPU. Under ``braindiffuser`` the SSIM
    is the mean of 1-D SSIMs down the columns (scikit-image 0.17.2's ``multichannel=True`` on a grey
    image; see :func:`ssim_gray`).

    Args:
        protocol: ``"mindeye2"`` or ``"braindiffuser"``.
        **kwargs: :class:`~torchmetrics.Metric` options.
    """

    def _per_pair(self, recons: Tensor, gt: Tensor) -> Tensor:
        x = rgb_to_gray(self.protocol.pixel_input(recons).double())  # (B, 1, 425, 425)
        y = rgb_to_gray(self.protocol.pixel_input(gt).double())
        return ssim_gray(x, y, data_range=1.0, mode=self.protocol.ssim_mode)
