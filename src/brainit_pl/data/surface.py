"""fsaverage surface betas: the second input kind (the Brain-IT authors' choice, see docs/method.md §1).

NSD ships single-trial betas resampled to FreeSurfer's fsaverage surface, one MGH file per hemisphere
and session (``NSDLayout.betas_mgh``): shape (163842, 1, 1, 750), float32, already in percent signal
change (unlike the int16 × 300 volumes; NSD's data manual and the files' ``>f4`` header agree). The
Brain-IT authors keep the vertices inside the Algonauts-2023 challenge mask (~40k per subject: the
challenge's ``roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy``, one 0/1 value per fsaverage vertex).

Conventions used everywhere here:

* a vertex mask is one bool array over both hemispheres, lh first: (n_lh + n_rh,), the two halves of
  equal length (fsaverage: 163842 each);
* selected vertices are ordered lh then rh, each by vertex id;
* in the store a vertex is ``ijk = (vertex id within its hemisphere, hemisphere 0 = lh / 1 = rh, -1)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brainit_pl.data.layout import HEMISPHERES, NSD_BETA_SCALE, NSDLayout
from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)

FSAVERAGE_VERTICES = 163842  # per hemisphere (icosahedron order 7)
ALGONAUTS_MASK_FILE = "{hemi}.all-vertices_fsaverage_space.npy"  # Algonauts 2023: subjNN/roi_masks/
GIFTI_SIDES = {"lh": "left", "rh": "right"}


# ----------------------------------------------------------------------------------------------- mask
def _as_bool(values: np.ndarray, what: str) -> np.ndarray:
    """A 0/1 (or bool) 1-D array → bool; anything else (labels, NaN, 2-D) is a user error."""
    values = np.asarray(values)
    require(values.ndim == 1, f"{what} must be a 1-D array over vertices, found shape {values.shape}")
    if values.dtype == np.bool_:
        return values
    require(
        values.dtype.kind in "iuf" and bool(np.isin(values, (0, 1)).all()),
        f"{what} must hold 0/1 (or bool) values, found dtype {values.dtype} with values "
        f"{np.unique(values)[:5].tolist()}...",
    )
    return values.astype(bool)


def _load_npy(path: Path) -> np.ndarray:
    require(path.is_file(), f"vertex mask {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BrainITError(f"{path} is not a readable .npy/.npz file ({err})") from err


def load_vertex_mask(path: str | Path) -> np.ndarray:
    """Read a vertex mask over both hemispheres.

    Accepted forms:

    * a ``.npy`` bool or 0/1 array (n_lh + n_rh,), lh first;
    * a ``.npz`` with arrays ``lh`` and ``rh``;
    * a folder holding the Algonauts-2023 files ``lh.all-vertices_fsaverage_space.npy`` and
      ``rh.all-vertices_fsaverage_space.npy`` (the challenge's ``subjNN/roi_masks``), or a subject
      folder holding ``roi_masks/`` with them.

    Args:
        path: one of the above.

    Returns:
        (n_lh + n_rh,) bool, lh first; both halves have the same length (fsaverage: 163842).

    Raises:
        BrainITError: missing/unreadable file, values other than 0/1, unequal hemispheres, empty mask.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "roi_masks" if (path / "roi_masks").is_dir() else path
        files = [folder / ALGONAUTS_MASK_FILE.format(hemi=h) for h in HEMISPHERES]
        parts = [_as_bool(_load_npy(f), str(f)) for f in files]
    elif path.suffix == ".npz":
        data = _load_npy(path)
        require(
            set(HEMISPHERES) <= set(data.files),
            f"{path} must hold arrays 'lh' and 'rh', found {sorted(data.files)}",
        )
        parts = [_as_bool(data[h], f"{path}[{h!r}]") for h in HEMISPHERES]
        data.close()
    else:
        mask = _as_bool(_load_npy(path), str(path))
        require(
            len(mask) % 2 == 0,
            f"{path} has {len(mask)} values; expected both hemispheres, lh then rh, of equal length "
            f"(fsaverage: 2 × {FSAVERAGE_VERTICES})",
        )
        parts = [mask[: len(mask) // 2], mask[len(mask) // 2 :]]
    require(
        len(parts[0]) == len(parts[1]),
        f"vertex mask {path}: lh has {len(parts[0])} vertices but rh {len(parts[1])}; fsaverage has "
        f"{FSAVERAGE_VERTICES} per hemisphere",
    )
    mask = np.concatenate(parts)
    require(bool(mask.any()), f"vertex mask {path} selects no vertex")
    if len(parts[0]) != FSAVERAGE_VERTICES:
        log.warning(
            "vertex mask %s has %d vertices per hemisphere, not fsaverage's %d",
            path,
            len(parts[0]),
            FSAVERAGE_VERTICES,
        )
    log.info("vertex mask %s: %d lh + %d rh vertices", path, int(parts[0].sum()), int(parts[1].sum()))
    return mask


def _halves(vertex_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(vertex_mask, dtype=bool).ravel()
    require(
        len(mask) % 2 == 0 and len(mask) > 0,
        f"a vertex mask covers two equal hemispheres, got {len(mask)} values",
    )
    return mask[: len(mask) // 2], mask[len(mask) // 2 :]


# ---------------------------------------------------------------------------------------------- betas
def _read_mgh(path: Path) -> np.ndarray:
    """An MGH betas file → (n_vertices, T) array (a memory map where nibabel can make one)."""
    import nibabel as nib

    require(path.is_file(), f"fsaverage betas {path} not found")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)  # native dtype, no float64 copy of a 0.5 GB file
    except Exception as err:  # nibabel raises many types (ImageFileError, TypeError, EOFError, ...)
        raise BrainITError(f"{path} is not a readable MGH file ({err})") from err
    shape = tuple(int(n) for n in data.shape)
    # NSD's convention: (vertices, 1, 1, trials); MGH stores a single frame as (vertices, 1, 1).
    require(
        len(shape) in (3, 4) and shape[1:3] == (1, 1),
        f"{path} has shape {shape}; expected (vertices, 1, 1, trials) as NSD's fsaverage betas",
    )
    return data.reshape(shape[0], -1)


def read_surface_session(
    layout: NSDLayout, subject: int, session: int, vertex_mask: np.ndarray
) -> np.ndarray:
    """Betas of one session on the selected fsaverage vertices.

    Float MGH files (NSD's) are already percent signal change and are returned as they are; an integer
    file is taken to follow NSD's int16 convention and is divided by 300 (``NSD_BETA_SCALE``).

    Args:
        layout: the NSD tree; reads ``layout.betas_mgh(subject, session, "lh" / "rh")``.
        subject: 1-based subject.
        session: 1-based session.
        vertex_mask: (n_lh + n_rh,) bool from :func:`load_vertex_mask`.

    Returns:
        (T, V) float32, V = ``vertex_mask.sum()``: lh vertices then rh vertices, each by vertex id.

    Raises:
        BrainITError: a missing or unreadable file (named), a vertex count that differs from the mask,
            unequal trial counts between hemispheres, NaN or inf on a selected vertex.
    """
    blocks = []
    for hemi, keep in zip(HEMISPHERES, _halves(vertex_mask)):
        path = layout.betas_mgh(subject, session, hemi)
        data = _read_mgh(path)  # (n_vertices, T)
        require(
            data.shape[0] == len(keep),
            f"{path} has {data.shape[0]} vertices but the vertex mask has {len(keep)} per hemisphere",
        )
        block = np.asarray(data[np.flatnonzero(keep)]).T  # (T, V_hemi), a copy out of the memory map
        scale = np.float32(NSD_BETA_SCALE if block.dtype.kind in "iu" else 1.0)
        block = block.astype(np.float32) / scale
        bad = ~np.isfinite(block)
        if bad.any():
            trial, col = np.argwhere(bad)[0]
            raise BrainITError(
                f"{path}: NaN or inf betas on {int(bad.any(axis=0).sum())} selected vertices "
                f"(first: vertex {int(np.flatnonzero(keep)[col])}, trial {int(trial)})"
            )
        if blocks:
            require(
                block.shape[0] == blocks[0].shape[0],
                f"{path} has {block.shape[0]} trials but the lh file has {blocks[0].shape[0]}",
            )
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


# ------------------------------------------------------------------------------------------- geometry
def _surface_coords(surf_dir: Path, hemi: str, surface: str) -> np.ndarray:
    """Vertex coordinates (n, 3) of one hemisphere: FreeSurfer ``{hemi}.{surface}`` or nilearn's GIFTI."""
    import nibabel as nib
    from nibabel.freesurfer import read_geometry

    freesurfer = surf_dir / f"{hemi}.{surface}"
    gifti = [surf_dir / f"{surface}_{GIFTI_SIDES[hemi]}.gii{ext}" for ext in (".gz", "")]
    try:
        if freesurfer.is_file():
            return read_geometry(freesurfer)[0]
        for path in gifti:
            if path.is_file():
                return nib.load(path).agg_data("pointset")
    except Exception as err:  # nibabel raises several types for a damaged surface
        raise BrainITError(f"cannot read the {hemi} {surface} surface in {surf_dir} ({err})") from err
    raise BrainITError(
        f"no {hemi} {surface} surface in {surf_dir}: expected {freesurfer.name} or {gifti[0].name}"
    )


def vertex_table(
    vertex_mask: np.ndarray, surf_dir: str | Path | None = None, surface: str = "pial"
) -> tuple[np.ndarray, np.ndarray]:
    """The store's voxel table for the selected vertices (lh then rh, each by vertex id).

    Coordinates: full-resolution fsaverage meshes are not available offline (nilearn ships only
    fsaverage5; ``nilearn.datasets.load_fsaverage("fsaverage")`` would download), so by default
    ``xyz`` is all zeros, i.e. *no geometry*: an anatomical baseline must not cluster on it. Pass
    ``surf_dir`` (FreeSurfer's ``$FREESURFER_HOME/subjects/fsaverage/surf`` with ``lh.pial``, or a
    folder of nilearn's ``pial_left.gii.gz`` files) to get real coordinates. The pial surface is the
    default because the two hemispheres' spheres overlap in space while their pial surfaces do not.

    Args:
        vertex_mask: (n_lh + n_rh,) bool.
        surf_dir: optional folder with the fsaverage surfaces.
        surface: which surface (``pial``, ``white``, ``sphere``, ``inflated``...).

    Returns:
        ijk: (V, 3) int32 = (vertex id within hemisphere, hemisphere 0/1, -1).
        xyz: (V, 3) float32 = surface coordinates in mm (fsaverage surface RAS), or zeros without
            ``surf_dir``.
    """
    halves = _halves(vertex_mask)
    ijk, xyz = [], []
    for h, (hemi, keep) in enumerate(zip(HEMISPHERES, halves)):
        ids = np.flatnonzero(keep)
        ijk.append(np.stack([ids, np.full_like(ids, h), np.full_like(ids, -1)], axis=1))
        if surf_dir is None:
            xyz.append(np.zeros((len(ids), 3), dtype=np.float32))
            continue
        coords = _surface_coords(Path(surf_dir), hemi, surface)
        require(
            coords.shape == (len(keep), 3),
            f"the {hemi} {surface} surface in {surf_dir} has {coords.shape[0]} vertices but the vertex mask "
            f"has {len(keep)} per hemisphere",
        )
        xyz.append(coords[ids])
    if surf_dir is None:
        log.info("fsaverage vertex coordinates not given (surf_dir=None): xyz is zeros (no geometry)")
    return np.concatenate(ijk).astype(np.int32), np.concatenate(xyz).astype(np.float32)
