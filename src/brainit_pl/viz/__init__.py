"""Pictures: image grids (stimuli, reconstructions) and brain maps (per-voxel values on the volume).

Layer (:mod:`brainit_pl.layers`): imports only ``errors`` and ``files``.
"""

from brainit_pl.viz.brain import plot_subject_map, plot_surface_map, plot_voxel_map, voxel_volume
from brainit_pl.viz.grids import log_png, save_image_grid

__all__ = [
    "log_png",
    "plot_subject_map",
    "plot_surface_map",
    "plot_voxel_map",
    "save_image_grid",
    "voxel_volume",
]
