"""Anatomy of the simulated subjects: a real brain mask, warped differently for every subject.

The template is nilearn's MNI152 grey-matter probability map and brain mask (2 mm, shipped inside
nilearn: no download). The "nsdgeneral" stand-in is posterior grey matter (probability > 0.62):
occipital cortex (y < -72 mm, -16 < z < 30 mm, above most of the cerebellum) plus ventral temporal
cortex (-72 <= y < -35, -28 < z < -4, 22 < |x| < 48 mm). At 1.8 mm this gives about 15k voxels, NSD's
size.

Each subject lives in its own "scanner" space: a grid of ``voxel_mm`` voxels whose points ``u`` map to
template coordinates through a small random affine (rotation up to 4 degrees, scale 1 +- 6 % per axis,
shift ~3 mm) and a smooth random warp (~2.5 mm, correlation length ~12 mm). Sampling the template
through that map gives each subject its own voxel set and count, and region borders that do not line up
across subjects in scanner coordinates. Functional maps (areas, retinotopy) are defined on template
coordinates plus a second, independent smooth jitter (~3 mm), so function does not follow anatomy
exactly either. The volume is cropped to the ROI's bounding box plus a margin; its NIfTI affine maps
voxel indices to the subject's scanner millimetres.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

GM_THRESHOLD = 0.62
BOX_MM = ((-76.0, 76.0), (-114.0, -30.0), (-34.0, 40.0))  # template region the subject grids cover
MARGIN_VOXELS = 2


def in_roi_box(xyz: np.ndarray) -> np.ndarray:
    """Whether template coordinates (..., 3) in mm lie in the nsdgeneral stand-in region."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    occipital = (y < -72) & (z > -16) & (z < 30)
    ventral = (y >= -72) & (y < -35) & (z > -28) & (z < -4) & (np.abs(x) > 22) & (np.abs(x) < 48)
    return occipital | ventral


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey-matter probability, brain mask, affine) of MNI152 at 2 mm; loaded once (~2 s)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template

    gm = load_mni152_gm_template(resolution=2)
    brain = load_mni152_brain_mask(resolution=2)
    return (
        np.asarray(gm.get_fdata(), np.float32),
        np.asarray(brain.get_fdata(), np.float32),
        np.asarray(gm.affine, np.float64),
    )


@dataclass
class SubjectAnatomy:
    """One subject's functional volume and ROI.

    Attributes:
        affine: (4, 4) voxel index -> scanner mm.
        nsdgeneral: (X, Y, Z) int16: -1 outside the brain, 0 brain outside the ROI, 1 ROI.
        ijk: (V, 3) int ROI voxel indices, in ``np.argwhere(nsdgeneral > 0)`` (C) order.
        template_xyz: (V, 3) float MNI mm each ROI voxel samples (after the anatomical warp).
        functional_xyz: (V, 3) float coordinates the functional maps are read at (plus the jitter).
        field_noise: (n_fields, V) float smooth unit-variance random fields over the ROI, used for
            patchy type assignment and spatially smooth SNR.
    """

    affine: np.ndarray
    nsdgeneral: np.ndarray
    ijk: np.ndarray
    template_xyz: np.ndarray
    functional_xyz: np.ndarray
    field_noise: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.nsdgeneral.shape)

    @property
    def n_voxels(self) -> int:
        return len(self.ijk)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """A smooth random field with unit standard deviation."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def build_anatomy(rng: np.random.Generator, voxel_mm: float, n_fields: int = 0) -> SubjectAnatomy:
    """Draw one subject's anatomy.

    Args:
        rng: the subject's generator (its draws define the subject).
        voxel_mm: isotropic voxel size.
        n_fields: how many smooth random fields over the ROI to return (``field_noise``).
    """
    gm, brain, t_affine = _template()
    lo = np.array([b[0] for b in BOX_MM])
    hi = np.array([b[1] for b in BOX_MM])
    shape = tuple(int(np.ceil(s)) + 1 for s in (hi - lo) / voxel_mm)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)  # (X, Y, Z, 3)
    u = lo + grid * voxel_mm  # scanner mm of every grid point
    centre = (lo + hi) / 2
    rot = Rotation.from_rotvec(np.deg2rad(rng.uniform(-4, 4, 3))).as_matrix()
    linear = rot @ np.diag(rng.uniform(0.94, 1.06, 3))
    shift = rng.normal(0, 3.0, 3)
    sigma = 12.0 / voxel_mm
    warp = np.stack([_smooth_field(rng, shape, sigma) for _ in range(3)], axis=-1) * 2.5
    x = (u - centre) @ linear.T + centre + shift + warp  # template mm, (X, Y, Z, 3)
    jitter = np.stack([_smooth_field(rng, shape, 10.0 / voxel_mm) for _ in range(3)], axis=-1) * 3.0

    t_inv = np.linalg.inv(t_affine)
    tijk = x @ t_inv[:3, :3].T + t_inv[:3, 3]
    coords = np.moveaxis(tijk, -1, 0)
    gm_s = ndimage.map_coordinates(gm, coords, order=1, mode="constant", cval=0.0)
    brain_s = ndimage.map_coordinates(brain, coords, order=1, mode="constant", cval=0.0) > 0.5
    roi = brain_s & (gm_s > GM_THRESHOLD) & in_roi_box(x)
    fields = [_smooth_field(rng, shape, 4.0 / voxel_mm) for _ in range(n_fields)]

    # crop to the ROI's bounding box + margin; the affine keeps scanner coordinates
    where = np.argwhere(roi)
    start = np.maximum(where.min(0) - MARGIN_VOXELS, 0)
    stop = np.minimum(where.max(0) + MARGIN_VOXELS + 1, shape)
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    vol = np.where(brain_s[crop], 0, -1).astype(np.int16)
    vol[roi[crop]] = 1
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * voxel_mm
    affine[:3, 3] = lo + start * voxel_mm
    ijk = np.argwhere(vol > 0)
    full_ijk = tuple((ijk + start).T)
    return SubjectAnatomy(
        affine=affine,
        nsdgeneral=vol,
        ijk=ijk,
        template_xyz=x[full_ijk],
        functional_xyz=x[full_ijk] + jitter[full_ijk],
        field_noise=np.stack([f[full_ijk] for f in fields]) if fields else np.zeros((0, len(ijk))),
    )
