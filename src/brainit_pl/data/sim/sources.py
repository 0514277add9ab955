"""The offline picture sources of the simulated stimuli, with what they show and where.

Only pictures that ship inside installed packages are used (nothing is downloaded): scikit-image's
``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ``hubble_deep_field``, the stereo ``motorcycle``,
``camera``, ``text``, ``page``, ``brick``, ``grass``, ``gravel``, the ``horse`` silhouette and the
``lfw_subset`` faces; scikit-learn's ``china`` and ``flower``; matplotlib's ``grace_hopper``. (Other
scikit-image images such as ``skin`` or ``lily`` need a pooch download and are left out.)

Each photograph carries labelled regions: a semantic category and a box in normalised source
coordinates ``(x0, y0, x1, y1)`` (x rightwards, y downwards, in [0, 1]). The face boxes of ``astronaut``,
``grace_hopper`` and ``camera`` come from scikit-image's LBP frontal-face cascade; the other boxes were
drawn by eye on a 1/8 grid. They are what the category-selective voxel types respond to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Semantic content the simulator knows about. The first eight are photograph contents; the last three
# are procedural shape classes (ellipses, polygons, gratings).
CATEGORIES: tuple[str, ...] = (
    "face", "body", "animal", "food", "plant", "vehicle", "place", "text", "round", "angular", "stripes",
)  # fmt: skip
OBJECT_CATEGORIES: tuple[str, ...] = ("face", "body", "animal", "food", "plant", "vehicle", "text")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Photo:
    """A colour (or grey, tinted on use) picture with labelled regions.

    Attributes:
        name: source name, recorded in each stimulus's content.
        pixels: (H, W, 3) uint8.
        regions: (category, box) pairs; box in normalised source coordinates.
    """

    name: str
    pixels: np.ndarray
    regions: tuple[tuple[str, Box], ...]


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = np.clip(np.asarray(a, dtype=np.float64) * 255.0, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


@functools.lru_cache(maxsize=1)
def load_photos() -> dict[str, Photo]:
    """All labelled photographs, loaded once per process (about 0.3 s)."""
    import skimage.data as skd
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = np.asarray(Image.open(f).convert("RGB"))
    specs: list[tuple[str, np.ndarray, list[tuple[str, Box]]]] = [
        ("astronaut", skd.astronaut(), [
            ("face", (0.35, 0.12, 0.56, 0.31)), ("body", (0.0, 0.25, 0.72, 1.0)),
            ("vehicle", (0.68, 0.0, 0.90, 0.55)),
        ]),
        ("grace_hopper", grace, [("face", (0.33, 0.19, 0.73, 0.53)), ("body", (0.05, 0.12, 0.95, 1.0))]),
        ("camera", skd.camera(), [
            ("face", (0.40, 0.24, 0.52, 0.35)), ("body", (0.0, 0.20, 0.62, 1.0)), ("place", (0.0, 0.0, 1.0, 1.0)),
        ]),
        ("chelsea", skd.chelsea(), [("animal", (0.05, 0.0, 0.95, 1.0))]),
        ("coffee", skd.coffee(), [("food", (0.10, 0.0, 0.85, 1.0))]),
        ("flower", flower, [("plant", (0.25, 0.20, 0.75, 1.0))]),
        ("rocket", skd.rocket(), [("vehicle", (0.45, 0.25, 0.60, 0.95)), ("place", (0.0, 0.0, 1.0, 1.0))]),
        ("china", china, [
            ("place", (0.0, 0.0, 1.0, 1.0)), ("plant", (0.75, 0.60, 1.0, 1.0)), ("plant", (0.0, 0.85, 0.5, 1.0)),
        ]),
        ("motorcycle", skd.stereo_motorcycle()[0], [
            ("vehicle", (0.15, 0.30, 0.98, 0.85)), ("place", (0.0, 0.0, 1.0, 1.0)),
        ]),
        ("text", skd.text(), [("text", (0.0, 0.0, 1.0, 1.0))]),
        ("page", skd.page(), [("text", (0.0, 0.0, 1.0, 1.0))]),
    ]  # fmt: skip
    return {name: Photo(name, _rgb(px), tuple(regs)) for name, px, regs in specs}


@functools.lru_cache(maxsize=1)
def load_textures() -> dict[str, np.ndarray]:
    """Grey textures for backgrounds, (H, W) float32 in [0, 1]; no semantic category."""
    import skimage.data as skd

    out = {name: getattr(skd, name)() for name in ("brick", "grass", "gravel")}
    out["hubble"] = skd.hubble_deep_field().mean(axis=-1)
    return {k: (np.asarray(v, np.float32) / 255.0) for k, v in out.items()}


@functools.lru_cache(maxsize=1)
def load_sprites() -> dict[str, np.ndarray]:
    """Small grey pictures pasted as objects: ``faces`` (100, 25, 25) float32 from LFW and the ``horse``
    silhouette mask (H, W) float32 (1 = horse)."""
    import skimage.data as skd

    faces = np.asarray(skd.lfw_subset()[:100], np.float32)  # the first 100 are faces, the rest are not
    horse = 1.0 - np.asarray(skd.horse(), np.float32)  # skimage's horse is black (False) on white
    return {"faces": faces, "horse": horse}


def regions_in_crop(photo: Photo, crop: Box) -> list[tuple[str, Box]]:
    """The photo's regions that fall inside ``crop``, re-expressed in crop-normalised coordinates."""
    cx0, cy0, cx1, cy1 = crop
    out = []
    for cat, (x0, y0, x1, y1) in photo.regions:
        ix0, iy0, ix1, iy1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        if ix1 - ix0 <= 0 or iy1 - iy0 <= 0:
            continue
        w, h = cx1 - cx0, cy1 - cy0
        out.append((cat, ((ix0 - cx0) / w, (iy0 - cy0) / h, (ix1 - cx0) / w, (iy1 - cy0) / h)))
    return out
