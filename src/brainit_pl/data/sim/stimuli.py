"""Stimuli of the simulated NSD: natural-looking compositions whose content the simulator knows.

Each image is a stack of layers drawn back to front on an S x S canvas:

1. a background: a square crop of a scene photograph (``place`` content), a tinted grey texture
   (brick, grass, gravel, the Hubble deep field) or coloured 1/f noise;
2. 0-3 objects: a crop of a photograph around one of its labelled regions (face, body, animal, food,
   plant, vehicle, text), or a sprite (an LFW face, the horse silhouette filled with fur colours), with
   random scale, position, horizontal flip and colour jitter (brightness, contrast, saturation, hue),
   under an elliptical or rectangular mask;
3. 0-3 procedural shapes: ellipses (``round``), polygons (``angular``) and gratings (``stripes``).

Every layer records its source and the categories it shows, with boxes in normalised image coordinates;
the per-category coverage maps (occlusion included) feed the category-selective voxel types. Image ``i``
of a stream depends only on ``(seed, stream, i)``, so any slice of the image id space can be generated
on its own, in any order, and the tree's images and the "external" images never coincide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from brainit_pl.data.sim.canvas import Layer, category_maps, render
from brainit_pl.data.sim.sources import (
    CATEGORIES,
    OBJECT_CATEGORIES,
    load_photos,
    load_sprites,
    load_textures,
    regions_in_crop,
)

TREE_STREAM, EXTERNAL_STREAM, CALIBRATION_STREAM = 0, 1, 2
_SCENES = ("china", "rocket", "motorcycle", "camera")


@dataclass
class StimulusBatch:
    """Images and what the response model needs from them.

    Attributes:
        images: (N, S, S, 3) uint8.
        small: (N, F, F, 3) float32 in [0, 1], the images at the feature resolution F.
        category_maps: (N, len(CATEGORIES), F, F) float32, visible coverage of each category.
        content: per image, ``{"layers": [...], "coverage": {category: fraction of the image}}``.
    """

    images: np.ndarray
    small: np.ndarray
    category_maps: np.ndarray
    content: list[dict]


# ------------------------------------------------------------------------------------------- layers
def _jitter(rng: np.random.Generator) -> np.ndarray:
    """A 3x3 colour transform: hue rotation about the grey axis x saturation x contrast x brightness."""
    theta = np.deg2rad(rng.uniform(-25, 25))
    k = np.ones(3) / np.sqrt(3)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx  # Rodrigues
    grey = np.full((3, 3), 1.0 / 3)
    sat = grey + rng.uniform(0.6, 1.3) * (np.eye(3) - grey)
    return (rng.uniform(0.75, 1.25) * rng.uniform(0.75, 1.25) * sat @ rot).astype(np.float32)


def _photo_layer(
    rng: np.random.Generator,
    name: str,
    crop: tuple[float, float, float, float],
    box: tuple[float, float, float, float],
    kind: str,
    mask: str,
) -> Layer:
    photo = load_photos()[name]
    h, w = photo.pixels.shape[:2]
    flip, colour = bool(rng.random() < 0.5), _jitter(rng)
    sub = photo.pixels[
        int(crop[1] * h) : int(np.ceil(crop[3] * h)), int(crop[0] * w) : int(np.ceil(crop[2] * w))
    ]
    regions = regions_in_crop(photo, crop)
    if flip:
        sub = sub[:, ::-1]
        regions = [(c, (1 - x1, y0, 1 - x0, y1)) for c, (x0, y0, x1, y1) in regions]
    sub = np.ascontiguousarray(sub)

    def rgb(bw: int, bh: int) -> np.ndarray:
        px = np.asarray(Image.fromarray(sub).resize((bw, bh), Image.BILINEAR), np.float32) / 255.0
        mean = px.mean(axis=(0, 1))
        return np.clip((px - mean) @ colour.T + mean, 0.0, 1.0)

    return Layer(kind, name, box, rgb, mask, regions)


def _tinted(grey: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """Render a grey picture as a two-colour ramp from ``c0`` (black) to ``c1`` (white)."""
    grey = np.ascontiguousarray(grey.astype(np.float32))

    def rgb(bw: int, bh: int) -> np.ndarray:
        t = np.asarray(Image.fromarray(grey).resize((bw, bh), Image.BILINEAR))[..., None]
        return np.clip(c0 + t * (c1 - c0), 0.0, 1.0)

    return rgb


def _background(rng: np.random.Generator) -> Layer:
    full = (0.0, 0.0, 1.0, 1.0)
    pick = rng.random()
    if pick < 0.4:  # a scene photograph: square crop, at least half of the short side
        name = _SCENES[rng.integers(len(_SCENES))]
        h, w = load_photos()[name].pixels.shape[:2]
        side = rng.uniform(0.5, 1.0) * min(h, w)
        x0, y0 = rng.uniform(0, w - side) / w, rng.uniform(0, h - side) / h
        return _photo_layer(rng, name, (x0, y0, x0 + side / w, y0 + side / h), full, "scene", "rect")
    c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    if pick < 0.7:  # a tinted grey texture
        textures = load_textures()
        name = list(textures)[rng.integers(len(textures))]
        tex = textures[name]
        side = int(rng.uniform(0.3, 1.0) * min(tex.shape))
        r, c = rng.integers(0, tex.shape[0] - side + 1), rng.integers(0, tex.shape[1] - side + 1)
        return Layer("texture", name, full, _tinted(tex[r : r + side, c : c + side], c0, c1))
    # coloured 1/f noise: the amplitude spectrum of natural images
    n = 64
    f = np.sqrt(np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2)
    f[0, 0] = 1.0
    spec = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) / f ** rng.uniform(1.0, 1.6)
    noise = np.real(np.fft.ifft2(spec))
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-8)
    return Layer("texture", "pink_noise", full, _tinted(noise, c0, c1))


def _object(rng: np.random.Generator) -> Layer:
    cat = OBJECT_CATEGORIES[rng.integers(len(OBJECT_CATEGORIES))]
    side = rng.uniform(0.3, 0.75)
    cx, cy = rng.uniform(0.15, 0.85, 2)
    mask = "ellipse" if rng.random() < 0.6 else "rect"
    sprites = load_sprites()
    if cat == "face" and rng.random() < 0.4:  # an LFW face, tinted with a skin tone
        face = sprites["faces"][rng.integers(len(sprites["faces"]))]
        tone = np.array([0.95, 0.75, 0.6], np.float32) * rng.uniform(0.4, 1.1)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        return Layer(
            "sprite",
            "lfw_face",
            box,
            _tinted(face, tone * 0.2, tone),
            "ellipse",
            [("face", (0.1, 0.05, 0.9, 0.95))],
        )
    if cat == "animal" and rng.random() < 0.4:  # the horse silhouette in fur colours
        horse = sprites["horse"]
        aspect = horse.shape[0] / horse.shape[1]
        box = (cx - side / 2, cy - side * aspect / 2, cx + side / 2, cy + side * aspect / 2)
        fur = rng.uniform(0.1, 0.7) * np.array([1.0, 0.7, 0.45], np.float32)
        grain = load_textures()["gravel"][:128, :128]
        alpha = horse[:, ::-1] if rng.random() < 0.5 else horse
        return Layer(
            "sprite",
            "horse",
            box,
            _tinted(grain, fur * 0.6, fur * 1.3),
            "alpha",
            [("animal", (0.0, 0.0, 1.0, 1.0))],
            alpha,
        )
    photos = load_photos()
    choices = [(p.name, box) for p in photos.values() for c, box in p.regions if c == cat]
    name, (x0, y0, x1, y1) = choices[rng.integers(len(choices))]
    grow = rng.uniform(1.0, 1.6)  # crop a bit around the labelled region
    mx, my = (x1 - x0) * (grow - 1) / 2, (y1 - y0) * (grow - 1) / 2
    crop = (max(0.0, x0 - mx), max(0.0, y0 - my), min(1.0, x1 + mx), min(1.0, y1 + my))
    h, w = photos[name].pixels.shape[:2]
    aspect = ((crop[3] - crop[1]) * h) / max((crop[2] - crop[0]) * w, 1e-6)
    bw, bh = (side, side * aspect) if aspect <= 1 else (side / aspect, side)
    box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    return _photo_layer(rng, name, crop, box, "object", mask)


def _shape(rng: np.random.Generator) -> Layer:
    kind = ("round", "angular", "stripes")[rng.integers(3)]
    w, h = rng.uniform(0.12, 0.45, 2)
    cx, cy = rng.uniform(0.1, 0.9, 2)
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    shade = rng.uniform(-0.3, 0.3, 2)
    if kind == "stripes":  # a grating: random orientation, 2-8 cycles across the shape
        theta, cycles, phase = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)

        def rgb(bw: int, bh: int) -> np.ndarray:
            yy, xx = np.mgrid[0:bh, 0:bw]
            t = (xx / bw * np.cos(theta) + yy / bh * np.sin(theta)) * cycles * 2 * np.pi + phase
            return c0 + (0.5 + 0.5 * np.sin(t))[..., None].astype(np.float32) * (c1 - c0)

        return Layer(
            "shape",
            kind,
            box,
            rgb,
            "ellipse" if rng.random() < 0.5 else "rect",
            [(kind, (0.0, 0.0, 1.0, 1.0))],
        )

    def flat(bw: int, bh: int) -> np.ndarray:  # a flat colour with a soft linear shading
        yy, xx = np.mgrid[0:bh, 0:bw]
        g = (shade[0] * (xx / bw - 0.5) + shade[1] * (yy / bh - 0.5))[..., None]
        return np.clip(c0 * (1 + g), 0.0, 1.0).astype(np.float32)

    if kind == "round":
        return Layer("shape", kind, box, flat, "ellipse", [(kind, (0.0, 0.0, 1.0, 1.0))])
    n = int(rng.integers(3, 7))  # a star-shaped polygon with 3-6 corners
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.6, 1.0, n) * 0.5
    poly = np.stack([0.5 + rad * np.cos(ang), 0.5 + rad * np.sin(ang)], axis=1)
    return Layer("shape", kind, box, flat, "poly", [(kind, (0.0, 0.0, 1.0, 1.0))], poly)


def compose_layers(rng: np.random.Generator) -> list[Layer]:
    """Draw the layers of one image (back to front)."""
    layers = [_background(rng)]
    items = [_object] * int(rng.choice(4, p=[0.1, 0.45, 0.3, 0.15]))
    items += [_shape] * int(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1]))
    for i in rng.permutation(len(items)):
        layers.append(items[i](rng))
    return layers


# ------------------------------------------------------------------------------------------- batches
def generate_stimuli(
    ids: Sequence[int] | np.ndarray, *, seed: int, size: int, feature_size: int, stream: int = TREE_STREAM
) -> StimulusBatch:
    """Generate the images ``ids`` of stream ``stream`` (each image depends only on seed, stream, id).

    Args:
        ids: image indices within the stream (for the tree: 0-based 73k ids).
        seed: the simulation seed.
        size: side S of the images.
        feature_size: side F of the reduced-resolution copy and category maps.
        stream: ``TREE_STREAM`` for the NSD tree, ``EXTERNAL_STREAM`` for extra unlabeled images.

    Returns:
        A :class:`StimulusBatch` with (N, S, S, 3) uint8 images.
    """
    n = len(ids)
    images = np.empty((n, size, size, 3), np.uint8)
    small = np.empty((n, feature_size, feature_size, 3), np.float32)
    cats = np.empty((n, len(CATEGORIES), feature_size, feature_size), np.float32)
    content = []
    for k, i in enumerate(ids):
        rng = np.random.default_rng([int(seed), int(stream), int(i)])
        layers = compose_layers(rng)
        images[k] = np.round(render(layers, size) * 255.0).astype(np.uint8)
        small[k] = (
            np.asarray(Image.fromarray(images[k]).resize((feature_size,) * 2, Image.BOX), np.float32) / 255
        )
        cats[k] = category_maps(layers, feature_size)
        coverage = {c: round(float(m.mean()), 4) for c, m in zip(CATEGORIES, cats[k]) if m.any()}
        content.append({"layers": [layer.record() for layer in layers], "coverage": coverage})
    return StimulusBatch(images, small, cats, content)


def make_external_images(n: int, seed: int, size: int) -> tuple[np.ndarray, list[dict]]:
    """Extra "unlabeled" images from the same generator (another stream: never in the NSD tree).

    Args:
        n: number of images.
        seed: generator seed (the simulation seed gives images distinct from the tree's).
        size: side S.

    Returns:
        images (n, S, S, 3) uint8 and, per image, its content record (layers and category coverage).
    """
    batch = generate_stimuli(
        np.arange(n), seed=seed, size=size, feature_size=min(32, size - size % 2), stream=EXTERNAL_STREAM
    )
    return batch.images, batch.content
