"""Read a raw NSD release (real or simulated: the same layout, see data/README.md and ``layout.py``).

What it gives the ``prepare`` job, one session at a time:

* ``expdesign`` (via :func:`~brainit_pl.data.expdesign.read_expdesign`) — ``nsd_expdesign.mat`` →
  :class:`~brainit_pl.data.expdesign.ExpDesign` (trial → image bookkeeping).
* :class:`NSDReader` — subjects and sessions on disk, the nsdgeneral ROI, the trial table of a subject
  (cross-checked against ``responses.tsv``), the betas of one session restricted to the ROI, and the
  stimuli resized for the image store.
* :func:`zscore_session` — NSD's per-session, per-voxel z-scoring.

Index conventions: ``masterordering``, ``subjectim`` and ``sharedix`` keep the file's 1-based values;
everything this module *returns* (``nsd_id``, trial within session) is 0-based, sessions are 1-based.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import zlib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from brainit_pl.data.expdesign import ExpDesign, read_expdesign
from brainit_pl.data.layout import NSD_BETA_SCALE, NSDLayout
from brainit_pl.data.store import open_h5, repeat_index
from brainit_pl.data.store_writer import resize_for_store
from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ z-scoring
def zscore_session(betas: np.ndarray, label: str = "session") -> np.ndarray:
    """Z-score each voxel over the trials of one session (population std, ddof=0), as NSD users do.

    A voxel that is constant within the session (zero variance; e.g. signal dropout) has no defined
    z-score: it is set to 0 (the session mean) and a warning names how many voxels were affected.

    Args:
        betas: (T, V) betas of one session.
        label: names the session in the warning.

    Returns:
        (T, V) float32, each column with mean 0 and std 1 (or all 0 when constant).
    """
    x = np.asarray(betas, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    constant = x.max(axis=0) == x.min(axis=0)  # exact test; a float std of a constant can be 1e-17
    if constant.any():
        log.warning(
            "%s: %d voxel(s) have zero variance; their z-scores are set to 0", label, int(constant.sum())
        )
    std[constant] = 1.0
    z = (x - mean) / std
    z[:, constant] = 0.0
    return z.astype(np.float32)


def check_betas(betas: np.ndarray, path: Path, trials_per_session: int) -> None:
    """Raise a :class:`BrainITError` naming ``path`` unless betas are (trials_per_session, V) and finite."""
    require(
        betas.shape[0] == trials_per_session,
        f"{path} has {betas.shape[0]} trials, expected {trials_per_session} (trials per session in the expdesign)",
    )
    bad = ~np.isfinite(betas)
    require(not bad.any(), f"{path} contains {int(bad.sum())} NaN/inf betas inside the ROI")


# ------------------------------------------------------------------------------------------ the reader
class NSDReader:
    """Read one raw NSD root. Cheap to create; files are opened when asked for.

    Args:
        root: the NSD root (holds ``nsddata``, ``nsddata_betas``, ``nsddata_stimuli``).
        prefer_hdf5: read a session's betas from its ``.hdf5`` twin when present. The twin is
            uncompressed and read as one hyperslab (the ROI's bounding box), whereas ``.nii.gz`` must be
            gunzipped from the start of the file. Measured on an NSD-sized session (81×104×83×750 int16,
            warm page cache, 1 core): 0.3 s from the ``.hdf5`` against 4.3 s from the ``.nii.gz``.
    """

    def __init__(self, root: str | Path, *, prefer_hdf5: bool = True) -> None:
        root = Path(root)
        require(
            root.is_dir(), f"NSD root {root} not found (expected a folder holding nsddata/, nsddata_betas/)"
        )
        self.layout = NSDLayout(root)
        self.prefer_hdf5 = prefer_hdf5

    @cached_property
    def expdesign(self) -> ExpDesign:
        return read_expdesign(self.layout.expdesign)

    def subjects(self) -> list[int]:
        """Subjects with a betas folder on disk."""
        return self.layout.subjects_on_disk()

    def sessions(self, subject: int, space: str = "func1pt8mm") -> list[int]:
        """Sessions with a betas file on disk for ``space`` (func1pt8mm or fsaverage), in order."""
        if space == "func1pt8mm":
            return self.layout.sessions_on_disk(subject)
        found = [p.name for p in self.layout.betas_dir(subject, space).glob("lh.betas_session*.mgh")]
        return sorted(int(n[len("lh.betas_session") : -len(".mgh")]) for n in found)

    # --------------------------------------------------------------------------------- anatomy
    def roi_mask(self, subject: int) -> tuple[np.ndarray, np.ndarray]:
        """The nsdgeneral ROI of ``subject`` → (mask (X, Y, Z) bool = value > 0, affine (4, 4))."""
        path = self.layout.nsdgeneral(subject)
        require(path.is_file(), f"nsdgeneral ROI {path} not found")
        img = _load_nifti(path)
        with _reading(path):
            mask = np.asarray(img.dataobj) > 0
        require(mask.ndim == 3, f"{path} must be a 3-D volume, found shape {mask.shape}")
        require(bool(mask.any()), f"{path} has no voxel > 0: the ROI is empty")
        return mask, np.asarray(img.affine, dtype=np.float64)

    @staticmethod
    def voxel_table(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ROI voxels in ``np.argwhere`` (C) order → (ijk (V, 3) int32, xyz (V, 3) float32 mm)."""
        from nibabel.affines import apply_affine

        ijk = np.argwhere(mask).astype(np.int32)
        return ijk, apply_affine(affine, ijk).astype(np.float32)

    def ncsnr(self, subject: int, mask: np.ndarray) -> np.ndarray | None:
        """Noise-ceiling SNR of the ROI voxels (V,) float32, or None when ``ncsnr.nii.gz`` is absent."""
        path = self.layout.ncsnr(subject)
        if not path.is_file():
            return None
        with _reading(path):
            vol = np.asarray(_load_nifti(path).dataobj)
        require(
            vol.shape[:3] == mask.shape, f"{path} has shape {vol.shape[:3]}, the nsdgeneral mask {mask.shape}"
        )
        return vol.reshape(mask.shape)[mask].astype(np.float32)

    # --------------------------------------------------------------------------------- trials
    def trial_table(self, subject: int, sessions: list[int]) -> dict[str, np.ndarray]:
        """Trial table of ``subject`` over ``sessions`` (in presentation order): the store's trial fields.

        ``nsd_id`` = subjectim[s, masterordering[g] - 1] - 1 (0-based), ``shared`` = masterordering[g] ≤
        n_shared, ``repeat`` counts earlier presentations of the image *within the chosen sessions*.
        When ``responses.tsv`` exists, its 73KID column must agree (else the first bad row is named).
        """
        design = self.expdesign
        tps = design.trials_per_session
        require(
            1 <= subject <= design.subjectim.shape[0],
            f"subject {subject} has no row in subjectim of {self.layout.expdesign} ({design.subjectim.shape[0]} subjects)",
        )
        bad = [s for s in sessions if not 1 <= s <= design.n_sessions_max]
        require(not bad, f"sessions {bad} are beyond the {design.n_sessions_max} sessions of the expdesign")
        session = np.repeat(np.asarray(sessions, dtype=np.int64), tps)
        trial = np.tile(np.arange(tps, dtype=np.int64), len(sessions))
        global_trial = (session - 1) * tps + trial
        column = design.masterordering[global_trial]  # 1-based
        nsd_id = design.subjectim[subject - 1, column - 1] - 1
        table = {
            "nsd_id": nsd_id,
            "session": session,
            "trial": trial,
            "global_trial": global_trial,
            "shared": column <= design.n_shared,
            "repeat": repeat_index(nsd_id),
        }
        self._check_responses(subject, sessions, nsd_id)
        return table

    def _check_responses(self, subject: int, sessions: list[int], nsd_id: np.ndarray) -> None:
        path = self.layout.responses(subject)
        if not path.is_file():
            return
        rows = [r for r in _read_responses(path) if r[1] in sessions]
        rows.sort(key=lambda r: sessions.index(r[1]))  # stable: file order within a session
        require(
            len(rows) == len(nsd_id),
            f"{path} has {len(rows)} trials in sessions {sessions}, the expdesign {len(nsd_id)}",
        )
        for k, (line, session, img) in enumerate(rows):
            require(
                img == nsd_id[k],
                f"{path} line {line} (session {session}, trial {k % self.expdesign.trials_per_session}): "
                f"73KID {img + 1} disagrees with the expdesign's {int(nsd_id[k]) + 1}",
            )

    # --------------------------------------------------------------------------------- betas
    def session_betas(self, subject: int, session: int, mask: np.ndarray) -> np.ndarray:
        """Betas of one session at the ROI voxels, in percent signal change (file value / 300).

        Reads the ROI's bounding box only, from the ``.hdf5`` twin (axes (T, Z, Y, X)) when present and
        ``prefer_hdf5``, else from the ``.nii.gz`` (axes (X, Y, Z, T)) through nibabel's array proxy.

        Args:
            mask: (X, Y, Z) bool ROI; voxels come out in ``np.argwhere(mask)`` order.

        Returns:
            (T, V) float32, T = trials per session of the expdesign.

        Raises:
            BrainITError: the file is missing, its volume shape differs from the mask, its trial count
                differs from the expdesign's, or a ROI beta is NaN/inf.
        """
        tps = self.expdesign.trials_per_session
        h5_path, nii_path = (
            self.layout.betas_hdf5(subject, session),
            self.layout.betas_nifti(subject, session),
        )
        ijk = np.argwhere(mask)
        lo, hi = ijk.min(axis=0), ijk.max(axis=0) + 1
        i, j, k = (ijk - lo).T
        if (self.prefer_hdf5 and h5_path.is_file()) or not nii_path.is_file():
            path = h5_path
            require(
                path.is_file(),
                f"betas of subject {subject} session {session} not found: {nii_path} (or {h5_path.name})",
            )
            try:
                with h5py.File(path, "r") as h5:
                    require("betas" in h5, f"{path} lacks the dataset 'betas'")
                    dset = h5["betas"]
                    shape = tuple(dset.shape[1:][::-1])
                    _check_volume(path, shape, dset.ndim, mask.shape)
                    box = dset[:, lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]  # (T, Z', Y', X')
            except OSError as err:
                raise BrainITError(f"{path} is not a readable HDF5 file ({err})") from err
            betas = box[:, k, j, i]  # (T, V)
        else:
            path = nii_path
            proxy = _load_nifti(path).dataobj
            _check_volume(path, tuple(proxy.shape[:3]), len(proxy.shape), mask.shape)
            with _reading(path):
                box = proxy[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2], :]  # (X', Y', Z', T)
            betas = box[i, j, k, :].T  # (T, V)
        betas = np.asarray(betas, dtype=np.float32) / np.float32(NSD_BETA_SCALE)
        check_betas(betas, path, tps)
        return betas

    # --------------------------------------------------------------------------------- stimuli
    def n_stimuli(self) -> int:
        path = self.layout.stimuli
        require(path.is_file(), f"NSD stimuli {path} not found")
        with open_h5(path, REFETCH) as h5:
            require("imgBrick" in h5, f"{path} lacks the dataset 'imgBrick'")
            return int(h5["imgBrick"].shape[0])

    def images(self, nsd_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Stimuli of ``nsd_ids`` (0-based, increasing) → ``{size: (n, 3, size, size) uint8}`` per store size.

        Resized with PIL's bicubic filter, whose support widens with the downscale factor (area-aware,
        i.e. anti-aliased; no ``reducing_gap`` shortcut, so it is exact rather than approximate). This is
        the callable :func:`brainit_pl.data.store.write_images` asks for.
        """

        ids = np.asarray(nsd_ids, dtype=np.int64)
        with open_h5(self.layout.stimuli, REFETCH) as h5, _reading(self.layout.stimuli):
            brick = h5["imgBrick"]
            require(
                ids.max() < brick.shape[0],
                f"{self.layout.stimuli} has {brick.shape[0]} images, id {ids.max()} asked",
            )
            raw = (
                brick[ids] if (np.diff(ids) > 0).all() else np.stack([brick[i] for i in ids])
            )  # (n, H, W, 3)
        return resize_for_store(raw)


def _read_responses(path: Path) -> list[tuple[int, int, int]]:
    """``responses.tsv`` → (line number in the file, session, 0-based 73k id) per trial, in file order."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = {"SESSION", "73KID"} - set(reader.fieldnames or [])
        require(not missing, f"{path} lacks the column(s) {sorted(missing)}")
        rows = []
        for line, r in enumerate(reader, start=2):
            try:  # NSD writes integers; tolerate "3.0"
                rows.append((line, int(float(r["SESSION"])), int(float(r["73KID"])) - 1))
            except (TypeError, ValueError) as err:
                raise BrainITError(f"{path} line {line}: SESSION/73KID are not numbers ({err})") from err
    return rows


REFETCH = "the file is truncated or damaged: copy it again from NSD"


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Around reading the data of a raw NSD file: a truncated or damaged one is one line naming it.

    (nibabel reads a ``.nii.gz`` header at load and its data only here: a cut-off download fails now, with
    EOFError, a zlib or gzip error; HDF5 with OSError.)
    """
    try:
        yield
    except (EOFError, OSError, zlib.error) as err:
        raise BrainITError(f"{path} could not be read ({type(err).__name__}: {err}); {REFETCH}") from err


def _load_nifti(path: Path):
    import nibabel as nib

    require(path.is_file(), f"{path} not found")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types (ImageFileError, OSError, EOFError, ...)
        raise BrainITError(f"{path} is not a readable NIfTI file ({err})") from err


def _check_volume(path: Path, shape: tuple[int, ...], ndim: int, mask_shape: tuple[int, ...]) -> None:
    require(ndim == 4, f"{path} must hold a 4-D betas array (volume × trials), found {ndim}-D")
    require(
        shape == tuple(mask_shape),
        f"{path} has volume shape {shape} (X, Y, Z) but the nsdgeneral mask has {tuple(mask_shape)}",
    )
