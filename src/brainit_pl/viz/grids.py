"""Image grids saved as PNG, e.g. stimuli previews and ground truth vs reconstruction rows."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from brainit_pl.errors import require
from brainit_pl.files import atomic_path


def _as_float_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images))
    require(t.ndim == 4, f"images must be 4-D (N, C, H, W) or (N, H, W, C), got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float().clamp(0, 1)


def save_image_grid(
    path: str | os.PathLike,
    rows: Sequence[np.ndarray | torch.Tensor],
    *,
    size: int = 128,
    padding: int = 2,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> None:
    """Save images as a grid PNG: one row per entry of ``rows`` (e.g. [ground truth, reconstruction]).

    Args:
        path: the PNG to write (atomically).
        rows: equal-length image batches, uint8 or float in [0, 1], (N, 3, H, W) or (N, H, W, 3).
        size: every image is resized to ``size``² (bilinear, anti-aliased) so rows of different
            resolutions line up.
        row_labels: a name per row, written in a margin on the left (e.g. the stages).
        col_labels: a name per column, written above it (e.g. the subject and image).
    """
    batches = [_as_float_nchw(r) for r in rows]
    require(len(batches) > 0, "no images to draw")
    n = len(batches[0])
    require(all(len(b) == n for b in batches), f"rows differ in length: {[len(b) for b in batches]}")
    resized = [
        torch.nn.functional.interpolate(
            b, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        for b in batches
    ]
    grid = make_grid(torch.cat(resized).clamp(0, 1), nrow=n, padding=padding, pad_value=1.0)  # (3, H', W')
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    if row_labels is not None or col_labels is not None:
        image = _labelled(image, row_labels, col_labels, size + padding)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _labelled(
    grid: Image.Image, rows: Sequence[str] | None, cols: Sequence[str] | None, step: int
) -> Image.Image:
    """``grid`` with row names in a left margin and column names in a top margin (Pillow's bundled font)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, step // 10))
    measure = ImageDraw.Draw(grid)
    left = 8 + max((measure.textlength(t, font=font) for t in rows or ()), default=0)
    top = 6 + font.size * 1.4 if cols else 0
    canvas = Image.new("RGB", (grid.width + int(left), grid.height + int(top)), "white")
    canvas.paste(grid, (int(left), int(top)))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(rows or ()):
        draw.text((4, top + i * step + step / 2), text, fill="black", font=font, anchor="lm")
    for j, text in enumerate(cols or ()):
        draw.text((left + j * step + step / 2, top / 2), text, fill="black", font=font, anchor="mm")
    return canvas


def log_png(logger, tag: str, path: str | os.PathLike, step: int = 0) -> bool:
    """Show a saved PNG in TensorBoard as image ``tag``.

    Args:
        logger: a Lightning logger (its ``experiment``), a ``SummaryWriter``, or ``None``.

    Returns:
        Whether it was logged (False without a writer that takes images, or without the file).
    """
    writer = getattr(logger, "experiment", logger)
    if writer is None or not hasattr(writer, "add_image") or not os.path.isfile(path):
        return False
    with Image.open(path) as image:
        writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    return True
