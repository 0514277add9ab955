"""Drawing the simulated stimuli: layers with masks, composited back to front, and category maps.

A :class:`Layer` knows where it lies (a box in normalised image coordinates, x rightwards and y
downwards in [0, 1]), how to render its pixels at any size, the shape of its mask and which semantic
categories it shows where. Rendering and the category maps use the same masks, so the "content" the
category-selective voxels respond to is exactly what is visible in the image, occlusion included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from brainit_pl.data.sim.sources import CATEGORIES


@dataclass
class Layer:
    """One drawn element.

    Attributes:
        kind, source: what it is (``scene``, ``texture``, ``object``, ``sprite``, ``shape``) and from where.
        box: (x0, y0, x1, y1) where it lies in normalised image coordinates (it may stick out).
        rgb: ``rgb(w, h) -> (h, w, 3)`` float32 in [0, 1], its pixels rendered at that size.
        mask: ``"rect"``, ``"ellipse"``, ``"poly"`` (``mask_data``: (n, 2) corners, box-normalised x, y)
            or ``"alpha"`` (``mask_data``: a float (h, w) silhouette stretched over the box).
        regions: (category, box) pairs in box-normalised coordinates: what it shows where.
    """

    kind: str
    source: str
    box: tuple[float, float, float, float]
    rgb: Any
    mask: str = "rect"
    regions: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    mask_data: np.ndarray | None = None

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "box": [round(float(b), 4) for b in self.box],
            "categories": sorted({c for c, _ in self.regions}),
        }


def _alpha(layer: Layer, res: int) -> tuple[slice, slice, np.ndarray, tuple[int, int, int, int]]:
    """The layer's alpha over its visible pixel window at resolution ``res``."""
    x0, y0, x1, y1 = layer.box
    bx0, by0 = int(np.floor(x0 * res)), int(np.floor(y0 * res))
    bw, bh = max(1, int(round((x1 - x0) * res))), max(1, int(round((y1 - y0) * res)))
    c0, r0, c1, r1 = max(bx0, 0), max(by0, 0), min(bx0 + bw, res), min(by0 + bh, res)
    if c1 <= c0 or r1 <= r0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32), (bx0, by0, bw, bh)
    # pixel centres in box-normalised coordinates
    u = (np.arange(c0, c1) + 0.5 - bx0) / bw
    v = (np.arange(r0, r1) + 0.5 - by0) / bh
    if layer.mask == "rect":
        a = np.ones((r1 - r0, c1 - c0), np.float32)
    elif layer.mask == "ellipse":
        rho = np.sqrt(((u[None, :] - 0.5) / 0.5) ** 2 + ((v[:, None] - 0.5) / 0.5) ** 2)
        edge = 3.0 / max(min(bw, bh), 1)  # soft edge of about 1.5 pixels
        a = np.clip((1.0 - rho) / edge, 0.0, 1.0).astype(np.float32)
    elif layer.mask == "poly":
        from skimage.draw import polygon2mask

        corners = layer.mask_data
        poly = np.stack(
            [corners[:, 1] * bh - (r0 - by0) - 0.5, corners[:, 0] * bw - (c0 - bx0) - 0.5], axis=1
        )
        a = polygon2mask((r1 - r0, c1 - c0), poly).astype(np.float32)
    else:  # an alpha picture (sprite silhouette), stretched over the box
        full = np.asarray(
            Image.fromarray(layer.mask_data.astype(np.float32)).resize((bw, bh), Image.BILINEAR)
        )
        a = full[r0 - by0 : r1 - by0, c0 - bx0 : c1 - bx0]
    return slice(r0, r1), slice(c0, c1), a, (bx0, by0, bw, bh)


def render(layers: Sequence[Layer], size: int) -> np.ndarray:
    """Composite ``layers`` (back to front) into a (size, size, 3) float32 image in [0, 1]."""
    canvas = np.zeros((size, size, 3), np.float32)
    for layer in layers:
        rows, cols, a, (bx0, by0, bw, bh) = _alpha(layer, size)
        if a.size == 0:
            continue
        rgb = layer.rgb(bw, bh)[rows.start - by0 : rows.stop - by0, cols.start - bx0 : cols.stop - bx0]
        canvas[rows, cols] += a[..., None] * (rgb - canvas[rows, cols])
    return canvas


def category_maps(layers: Sequence[Layer], res: int) -> np.ndarray:
    """(len(CATEGORIES), res, res) float32 visible coverage of each category (later layers occlude)."""
    maps = np.zeros((len(CATEGORIES), res, res), np.float32)
    for layer in layers:
        rows, cols, a, _ = _alpha(layer, res)
        if a.size == 0:
            continue
        yy = (np.arange(rows.start, rows.stop) + 0.5) / res
        xx = (np.arange(cols.start, cols.stop) + 0.5) / res
        ind = np.zeros((len(CATEGORIES), *a.shape), np.float32)
        lx0, ly0, lx1, ly1 = layer.box
        for cat, (rx0, ry0, rx1, ry1) in layer.regions:  # region boxes are layer-box-normalised
            gx0, gx1 = lx0 + rx0 * (lx1 - lx0), lx0 + rx1 * (lx1 - lx0)
            gy0, gy1 = ly0 + ry0 * (ly1 - ly0), ly0 + ry1 * (ly1 - ly0)
            inside = ((yy >= gy0) & (yy <= gy1))[:, None] & ((xx >= gx0) & (xx <= gx1))[None, :]
            ind[CATEGORIES.index(cat)][inside] = 1.0
        maps[:, rows, cols] += a[None] * (ind - maps[:, rows, cols])  # later layers occlude earlier ones
    return maps
