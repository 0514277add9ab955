"""The simulated brain's function: visual areas, pRFs, functional types, SNR and noise-free responses.

**Areas** (same for every subject, placed on template coordinates plus the subject's functional jitter,
see :mod:`~brainit_pl.data.sim.anatomy`). With d = y + 108 mm (distance from the occipital pole) and
the calcarine line at z_c = 2 + 0.25 d, early areas are bands around the calcarine, measured by
``dist = sqrt((z - z_c)^2 + (0.6 max(|x| - 10, 0))^2)``: V1 (dist < 8), V2 (8-16), V3 (16-24), for
d < 40. Every other ROI voxel belongs to the nearest of the seeds hV4, LO, V3AB, FFA, PPA, EBA and VWFA
(VWFA in the left hemisphere only), placed near their usual MNI locations.

**Retinotopy.** Contralateral: left hemisphere (x < 0) -> right visual field. Dorsal (above the
calcarine) -> lower field. Eccentricity grows with d (cortical magnification: exponential in d). The
polar angle in V1 grows from the horizontal meridian at the calcarine to the vertical meridian at the
V1/V2 border and reverses in V2 and again in V3, as in real cortex. Higher areas are weakly
retinotopic: FFA and VWFA foveal, PPA peripheral. pRF size = s0 + s1 x eccentricity, both growing
along the hierarchy. ``prf_xy`` is in units of the image half-width, origin at the image centre,
x rightwards, y upwards; ``prf_size`` is the Gaussian sigma in the same units.

**Functional types** (:data:`TYPES`, shared by all subjects): each is a weight vector over the feature
maps of :mod:`~brainit_pl.data.sim.features`. Each area draws its voxels' types from its own mix
(:data:`AREA_TYPES`); within an area the types form patches (argmax of smooth random fields), so
anatomical neighbours differ in function and functional clustering can beat anatomical clustering.

**Response** of voxel v to image I (noise-free, in percent signal change)::

    raw_v(I)  = sum_p G_v(p) [ (W_type(v) + a_v D)^T  phi(I, p) ]       (G_v: the Gaussian pRF)
    resp_v(I) = baseline_v + amplitude_v (raw_v(I) - raw_mean_v) / raw_std_v

where D (3 x n_features) are shared random "deviation" directions and a_v ~ N(0, 0.25) a voxel's own
mix of them, and raw_mean/raw_std standardise over the subject's images. The noise sd is
amplitude_v / ncsnr_v, so ``ncsnr`` is exact by construction; log ncsnr is spatially smooth and higher
in early areas (median ~0.4, ~5 % above 1, as NSD's nsdgeneral voxels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainit_pl.data.sim.anatomy import SubjectAnatomy
from brainit_pl.data.sim.features import FEATURES, ORIENTATIONS, SCALES

AREAS: tuple[str, ...] = ("V1", "V2", "V3", "hV4", "LO", "V3AB", "FFA", "PPA", "EBA", "VWFA")
_SEEDS = {  # (|x|, y, z) in MNI mm
    "hV4": (28, -80, -12), "LO": (42, -82, 0), "V3AB": (26, -84, 26), "FFA": (40, -54, -18),
    "PPA": (26, -46, -10), "EBA": (48, -70, 4), "VWFA": (42, -58, -14),
}  # fmt: skip
# pRF: eccentricity range for non-early areas (e0 + e1 * position), size s0 + s1 * eccentricity
_ECC = {"hV4": (0.1, 0.9), "LO": (0.1, 0.8), "V3AB": (0.2, 0.9), "FFA": (0.0, 0.35), "PPA": (0.4, 0.8),
        "EBA": (0.2, 0.6), "VWFA": (0.0, 0.3)}  # fmt: skip
_SIZE = {
    "V1": (0.04, 0.08),
    "V2": (0.05, 0.12),
    "V3": (0.07, 0.16),
    "hV4": (0.12, 0.25),
    "LO": (0.25, 0.3),
    "V3AB": (0.2, 0.3),
    "FFA": (0.45, 0.3),
    "PPA": (0.55, 0.3),
    "EBA": (0.45, 0.3),
    "VWFA": (0.4, 0.3),
}
_SNR_OFFSET = {"V1": 0.45, "V2": 0.4, "V3": 0.3, "hV4": 0.15, "LO": 0.1, "V3AB": 0.1, "FFA": 0.0,
               "PPA": 0.0, "EBA": 0.0, "VWFA": -0.2}  # fmt: skip


def _types() -> dict[str, dict[str, float]]:
    t: dict[str, dict[str, float]] = {
        "luminance": {"lum": 1.0, "contrast_lo": 0.3},
        "red_green": {"rg": 1.0, "contrast_lo": 0.3},
        "blue_yellow": {"by": 1.0, "contrast_lo": 0.3},
    }
    for s in SCALES:
        for o in ORIENTATIONS:
            t[f"edge_{o}_{s}"] = {f"orient_{o}_{s}": 1.0, f"contrast_{s}": 0.6}
    t.update({
        "colour": {"sat": 1.0, "rg": 0.4, "by": -0.3},
        "texture": {"edges": 1.0, "contrast_hi": 0.5},
        "curved": {"cat_round": 1.0, "edges": 0.3},
        "angular": {"cat_angular": 1.0, "cat_stripes": 0.5, "edges": 0.3},
        "face": {"cat_face": 1.0, "cat_body": 0.2, "cat_animal": 0.2},
        "body": {"cat_body": 1.0, "cat_face": 0.3, "cat_animal": 0.3},
        "animal": {"cat_animal": 1.0, "cat_face": 0.2},
        "place": {"cat_place": 1.0, "cat_vehicle": 0.2, "contrast_lo": 0.2},
        "object": {"cat_food": 0.8, "cat_vehicle": 0.8, "cat_plant": 0.5},
        "text": {"cat_text": 1.0, "edges": 0.2},
    })  # fmt: skip
    return t


TYPE_FEATURES = _types()
TYPES: tuple[str, ...] = tuple(TYPE_FEATURES)


def _edges(scales: tuple[str, ...], total: float) -> dict[str, float]:
    return {f"edge_{o}_{s}": total / (4 * len(scales)) for s in scales for o in ORIENTATIONS}


AREA_TYPES: dict[str, dict[str, float]] = {
    "V1": {"luminance": 0.12, "red_green": 0.1, "blue_yellow": 0.08, **_edges(("hi", "mid"), 0.7)},
    "V2": {"luminance": 0.08, "red_green": 0.08, "blue_yellow": 0.06, "texture": 0.1, **_edges(("mid", "lo"), 0.68)},
    "V3": {"luminance": 0.1, "colour": 0.1, "texture": 0.2, **_edges(("lo",), 0.5), **_edges(("mid",), 0.1)},
    "hV4": {"colour": 0.45, "texture": 0.2, "curved": 0.2, "red_green": 0.075, "blue_yellow": 0.075},
    "LO": {"curved": 0.3, "angular": 0.25, "texture": 0.15, "object": 0.3},
    "V3AB": {"texture": 0.3, "place": 0.2, "angular": 0.2, **_edges(("lo",), 0.3)},
    "FFA": {"face": 0.75, "body": 0.15, "animal": 0.1},
    "PPA": {"place": 0.75, "object": 0.15, "texture": 0.1},
    "EBA": {"body": 0.6, "face": 0.15, "animal": 0.25},
    "VWFA": {"text": 0.8, "angular": 0.2},
}  # fmt: skip
N_DEVIATIONS = 3
N_FIELDS = len(TYPES) + 1  # one smooth field per type + one for the SNR map


def type_weights(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(len(TYPES), len(FEATURES)) type weights and (N_DEVIATIONS, len(FEATURES)) deviation directions.

    Drawn once per simulation (shared by its subjects): each type's named weights plus a small random
    part, so types differ in more than their headline feature.
    """
    w = rng.normal(0.0, 0.05, (len(TYPES), len(FEATURES)))
    for t, name in enumerate(TYPES):
        for feat, value in TYPE_FEATURES[name].items():
            w[t, FEATURES.index(feat)] += value
    dev = rng.normal(0.0, 1.0, (N_DEVIATIONS, len(FEATURES))) / np.sqrt(len(FEATURES))
    return w.astype(np.float32), dev.astype(np.float32)


@dataclass
class SubjectBrain:
    """The function of one subject's ROI voxels (V of them); see the module docstring.

    Attributes:
        area, type: (V,) int indices into :data:`AREAS` / :data:`TYPES`.
        prf_xy: (V, 2) pRF centres; prf_size: (V,) pRF sigma (image half-width units).
        ncsnr: (V,) true noise-ceiling SNR; amplitude, baseline: (V,) response sd and mean (% signal).
        deviation: (V, N_DEVIATIONS) the voxel's own mix of the shared deviation directions.
    """

    area: np.ndarray
    type: np.ndarray
    prf_xy: np.ndarray
    prf_size: np.ndarray
    ncsnr: np.ndarray
    amplitude: np.ndarray
    baseline: np.ndarray
    deviation: np.ndarray

    @property
    def noise_sd(self) -> np.ndarray:
        return (self.amplitude / self.ncsnr).astype(np.float32)

    def pooling_matrix(self, grid: int) -> np.ndarray:
        """(V, grid * grid) Gaussian pRF weights over a grid covering the image (row-major, row 0 = top).

        Normalised by the Gaussian's full integral, so a pRF half outside the image gets half the drive.
        """
        c = (np.arange(grid) + 0.5) / grid * 2 - 1  # pixel centres in [-1, 1]
        px = 2.0 / grid
        sig = np.maximum(self.prf_size, px / 2)[:, None]
        gx = np.exp(-((c[None, :] - self.prf_xy[:, :1]) ** 2) / (2 * sig**2))  # (V, grid) columns
        gy = np.exp(-((-c[None, :] - self.prf_xy[:, 1:]) ** 2) / (2 * sig**2))  # (V, grid) rows, y up
        g = gy[:, :, None] * gx[:, None, :]  # (V, grid, grid)
        norm = np.maximum(g.sum(axis=(1, 2)), 2 * np.pi * (sig[:, 0] / px) ** 2)
        return (g / norm[:, None, None]).reshape(len(g), -1).astype(np.float32)

    def raw_responses(self, maps: np.ndarray, weights: np.ndarray, deviations: np.ndarray) -> np.ndarray:
        """Unstandardised responses (N, V) to feature maps (N, n_features, P, P).

        The products run on one BLAS thread: a multi-threaded GEMM sums in an order that depends on the
        thread count, and the same seed must give the same bytes whatever OMP/BLAS settings are in force.
        """
        from threadpoolctl import threadpool_limits  # ships with scikit-learn

        with threadpool_limits(limits=1, user_api="blas"):
            return self._raw_responses(maps, weights, deviations)

    def _raw_responses(self, maps: np.ndarray, weights: np.ndarray, deviations: np.ndarray) -> np.ndarray:
        n, _, p, _ = maps.shape
        flat = maps.reshape(n, maps.shape[1], p * p)  # (N, F, P^2)
        g = self.pooling_matrix(p)  # (V, P^2)
        out = np.zeros((n, len(g)), np.float32)
        for t in np.unique(self.type):  # one combined map per type present: (N, P^2) @ (P^2, V_t)
            sel = np.flatnonzero(self.type == t)
            out[:, sel] = np.einsum("f,nfp->np", weights[t], flat) @ g[sel].T
        for k in range(len(deviations)):
            out += (np.einsum("f,nfp->np", deviations[k], flat) @ g.T) * self.deviation[:, k]
        return out


def _retinotopy(xyz: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area index (V,), pRF centre (V, 2) and size (V,) from functional coordinates (V, 3)."""
    x, y, z = xyz.T
    d = np.clip(y + 108.0, 0.0, None)
    dz = z - (2.0 + 0.25 * d)
    dist = np.sqrt(dz**2 + (0.6 * np.clip(np.abs(x) - 10.0, 0.0, None)) ** 2)
    area = np.full(len(xyz), -1)
    early = d < 40
    for k, (a, b) in enumerate(((0, 8), (8, 16), (16, 24))):
        area[early & (dist >= a) & (dist < b)] = k
    rest = area < 0
    names = [n for n in AREAS if n in _SEEDS]
    seeds = np.array([_SEEDS[n] for n in names], float)
    folded = np.stack([np.abs(x), y, z], axis=1)
    dseed = np.linalg.norm(folded[:, None] - seeds[None], axis=-1)  # (V, n_seeds)
    dseed[:, names.index("VWFA")] += np.where(x < 0, 0.0, np.inf)  # left-lateralised
    nearest = dseed.argmin(1)
    area[rest] = np.array([AREAS.index(n) for n in names])[nearest[rest]]

    ecc = 0.05 + 1.25 * np.expm1(d / 18.0) / np.expm1(40.0 / 18.0)
    angle = np.clip(np.abs(dz) / 25.0, 0.0, 1.0) * np.pi / 2  # from the horizontal meridian
    band = [(0, 8), (8, 16), (16, 24)]
    for k, (a, b) in enumerate(band):
        sel = area == k
        frac = np.clip((dist[sel] - a) / (b - a), 0.0, 1.0)
        angle[sel] = (1 - frac if k == 1 else frac) * np.pi / 2  # V2 reverses the V1/V3 direction
    for name in names:
        sel = area == AREAS.index(name)
        e0, e1 = _ECC[name]
        ecc[sel] = e0 + e1 * np.clip(dseed[sel, names.index(name)] / 20.0, 0.0, 1.0)
    side = np.where(x < 0, 1.0, -1.0)  # contralateral
    updown = np.where(dz > 0, -1.0, 1.0)  # dorsal -> lower field
    xy = np.stack([side * ecc * np.cos(angle), updown * ecc * np.sin(angle)], axis=1)
    s0 = np.array([_SIZE[a][0] for a in AREAS])[area]
    s1 = np.array([_SIZE[a][1] for a in AREAS])[area]
    size = (s0 + s1 * ecc) * np.exp(rng.normal(0, 0.1, len(xyz)))
    xy = xy + rng.normal(0, 1, xy.shape) * (0.02 + 0.1 * size[:, None])
    return area, xy.astype(np.float32), size.astype(np.float32)


def build_brain(anatomy: SubjectAnatomy, rng: np.random.Generator) -> SubjectBrain:
    """Draw one subject's voxel function on its anatomy (``anatomy.field_noise`` needs N_FIELDS fields)."""
    v = anatomy.n_voxels
    area, prf_xy, prf_size = _retinotopy(anatomy.functional_xyz, rng)
    vtype = np.empty(v, np.int64)
    fields = anatomy.field_noise  # (N_FIELDS, V) smooth unit-variance fields
    for a, name in enumerate(AREAS):
        sel = np.flatnonzero(area == a)
        if len(sel) == 0:
            continue
        names = list(AREA_TYPES[name])
        logp = np.log(np.array([AREA_TYPES[name][t] for t in names]))
        idx = [TYPES.index(t) for t in names]
        # patchy assignment: area prior + smooth field + a little per-voxel salt
        score = logp[:, None] + 1.5 * fields[idx][:, sel] + 0.5 * rng.standard_normal((len(idx), len(sel)))
        vtype[sel] = np.array(idx)[score.argmax(0)]
    offset = np.array([_SNR_OFFSET[a] for a in AREAS])[area]
    log_snr = np.log(0.32) + offset + 0.4 * fields[-1] + 0.4 * rng.standard_normal(v)
    return SubjectBrain(
        area=area.astype(np.int16),
        type=vtype.astype(np.int16),
        prf_xy=prf_xy,
        prf_size=prf_size,
        ncsnr=np.clip(np.exp(log_snr), 0.05, 2.5).astype(np.float32),
        amplitude=np.clip(np.exp(rng.normal(0.0, 0.25, v)), 0.4, 2.0).astype(np.float32),
        baseline=rng.normal(0.8, 0.5, v).astype(np.float32),
        deviation=rng.normal(0.0, 0.25, (v, N_DEVIATIONS)).astype(np.float32),
    )
