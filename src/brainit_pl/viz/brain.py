"""Brain maps: per-voxel values (a cluster label, a noise ceiling, an attention weight) on the volume.

Voxels are identified as in the store: integer indices ``ijk`` (V, 3) into a volume of known shape and
affine. nilearn draws the map; this module only builds the NIfTI it needs.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from brainit_pl.errors import require
from brainit_pl.files import atomic_path


def voxel_volume(
    values: np.ndarray, ijk: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray, *, fill: float = 0.0
) -> nib.Nifti1Image:
    """Scatter per-voxel ``values`` (V,) at ``ijk`` (V, 3) into a 3-D NIfTI of ``shape`` and ``affine``."""
    values = np.asarray(values, dtype=np.float32)
    ijk = np.asarray(ijk, dtype=np.int64)
    require(ijk.ndim == 2 and ijk.shape[1] == 3, f"ijk must be (V, 3), got {ijk.shape}")
    require(values.shape == (len(ijk),), f"{values.shape[0]} values for {len(ijk)} voxels")
    require(
        bool((ijk >= 0).all()) and bool((ijk < np.asarray(shape)).all()),
        f"voxel indices fall outside the volume of shape {tuple(shape)}",
    )
    volume = np.full(shape, fill, dtype=np.float32)
    volume[tuple(ijk.T)] = values
    return nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64))


def _label_colormap(n_labels: int):
    """tab20 up to 20 labels; beyond, n evenly spaced hues in a seeded shuffled order, so that
    neighbouring label numbers (e.g. 128 V2C clusters) do not get near-identical colours."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if n_labels <= 20:
        return colormaps["tab20"]
    hues = colormaps["hsv"](np.linspace(0, 1, n_labels, endpoint=False))
    return ListedColormap(hues[np.random.default_rng(0).permutation(n_labels)])


def plot_voxel_map(
    path: str | os.PathLike,
    values: np.ndarray,
    ijk: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    *,
    title: str | None = None,
    categorical: bool = False,
    axes=None,
) -> None:
    """Draw per-voxel values on the MNI template and save a PNG.

    Args:
        categorical: labels (clusters, functional types) drawn as an ROI map with one colour per
            label (label + 1, so label 0 is visible); otherwise a stat map with a colour bar.
        axes: a matplotlib axes to draw into (nilearn convention); the PNG is written either way.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    values = np.asarray(values)
    img = voxel_volume(values + 1 if categorical else values, ijk, shape, affine)
    own_figure = axes is None
    if own_figure:
        fig, axes = plt.subplots(figsize=(9, 3.2))
    draw = plotting.plot_roi if categorical else plotting.plot_stat_map
    kwargs = {"cmap": _label_colormap(int(values.max()) + 1)} if categorical else {}
    draw(img, axes=axes, title=title, draw_cross=False, display_mode="ortho", **kwargs)
    with atomic_path(path) as tmp:
        axes.figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    if own_figure:
        plt.close(fig)


FSAVERAGE5_VERTICES = (
    10242  # per hemisphere; fsaverage's first 10,242 vertices are fsaverage5's (icosahedron)
)


def plot_surface_map(
    path: str | os.PathLike,
    values: np.ndarray,
    ijk: np.ndarray,
    *,
    title: str | None = None,
    categorical: bool = False,
) -> None:
    """Draw per-vertex values of an fsaverage store on nilearn's bundled fsaverage5 surfaces; save a PNG.

    ``ijk`` is the store's vertex table: (vertex id, hemisphere 0 = lh / 1 = rh, -1). fsaverage's vertex
    numbering nests its coarser icosahedra, so the vertices with ids below 10,242 are exactly fsaverage5's:
    they are drawn (on the inflated surface, lateral view), the finer ones are left out. ``categorical``:
    labels (clusters) as an ROI map, one colour per label, as :func:`plot_voxel_map` draws them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import datasets, plotting

    values, ijk = np.asarray(values, dtype=np.float32), np.asarray(ijk, dtype=np.int64)
    require(values.shape == (len(ijk),), f"{values.shape[0]} values for {len(ijk)} vertices")
    mesh = datasets.fetch_surf_fsaverage("fsaverage5")  # bundled with nilearn: no download
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), subplot_kw={"projection": "3d"})
    limit = float(np.abs(values).max()) or 1.0
    for hemi, (side, ax) in enumerate(zip(("left", "right"), axes)):
        texture = np.full(FSAVERAGE5_VERTICES, 0.0 if categorical else np.nan, dtype=np.float32)
        keep = (ijk[:, 1] == hemi) & (ijk[:, 0] < FSAVERAGE5_VERTICES)
        texture[ijk[keep, 0]] = values[keep] + 1 if categorical else values[keep]  # label 0 stays visible
        common = {
            "hemi": side,
            "bg_map": mesh[f"sulc_{side}"],
            "axes": ax,
            "figure": fig,
            "engine": "matplotlib",
        }
        if categorical:
            cmap = _label_colormap(int(values.max()) + 1)
            plotting.plot_surf_roi(mesh[f"infl_{side}"], texture.astype(int), cmap=cmap, **common)
        else:
            plotting.plot_surf_stat_map(
                mesh[f"infl_{side}"], texture, colorbar=hemi == 1, vmax=limit, **common
            )
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_subject_map(
    path: str | os.PathLike,
    values: np.ndarray,
    subject,
    *,
    title: str | None = None,
    categorical: bool = False,
) -> bool:
    """Per-voxel values of one subject of a store on its brain: the volume when the store has its geometry,
    the fsaverage surface for a surface store. ``subject`` is a store's subject (``ijk``, ``space``,
    ``affine``, ``volume_shape``); ``categorical``: labels, one colour each. Returns False (nothing drawn)
    when there is no geometry (a MindEye2 store)."""
    if subject.affine is not None and subject.volume_shape is not None:
        shape, affine = subject.volume_shape, subject.affine
        plot_voxel_map(path, values, subject.ijk, shape, affine, title=title, categorical=categorical)
        return True
    if str(getattr(subject, "space", "")).startswith("fsaverage"):
        plot_surface_map(path, values, subject.ijk, title=title, categorical=categorical)
        return True
    return False
