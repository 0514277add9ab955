"""``nsd_expdesign.mat``: NSD's trial → image bookkeeping, read and validated.

Index conventions: ``masterordering``, ``subjectim`` and ``sharedix`` keep the file's 1-based values.
The image of global trial g (0-based) for subject s (1-based) is ``subjectim[s - 1, masterordering[g] - 1] - 1``
(a 0-based 73k id); the trial is a test trial iff ``masterordering[g] <= n_shared``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from brainit_pl.data.layout import NSD_TRIALS_PER_SESSION
from brainit_pl.errors import BrainITError, require


@dataclass(frozen=True)
class ExpDesign:
    """The NSD experimental design (``nsd_expdesign.mat``), values exactly as in the file.

    Attributes:
        masterordering: (G,) int64, 1-based column of ``subjectim`` shown at global trial g (0-based);
            the same for every subject. G = sessions × trials_per_session (real NSD: 40 × 750).
        subjectim: (n_subjects, n_images) int64, 1-based 73k ids; the first ``n_shared`` columns are the
            shared images (validated to be ``sharedix`` for every subject).
        sharedix: (n_shared,) int64, 1-based 73k ids of the shared (test) images.
        trials_per_session: stimulus trials per session (per-session sum of ``stimpattern``; 750 if absent).
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    trials_per_session: int

    @property
    def n_shared(self) -> int:
        return len(self.sharedix)

    @property
    def n_sessions_max(self) -> int:
        return len(self.masterordering) // self.trials_per_session


def _load_mat(path: Path) -> dict[str, np.ndarray]:
    """Variables of a MATLAB file: v7.3 (an HDF5 file, arrays transposed) via h5py, older ones via scipy."""
    from scipy.io import loadmat

    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as h5:
                return {k: np.asarray(v).T for k, v in h5.items() if isinstance(v, h5py.Dataset)}
        return {k: np.asarray(v) for k, v in loadmat(path).items() if not k.startswith("__")}
    except (ValueError, OSError, TypeError, NotImplementedError) as err:
        raise BrainITError(f"{path} is not a readable MATLAB file ({err})") from err


def read_expdesign(path: str | Path) -> ExpDesign:
    """Read and validate ``nsd_expdesign.mat``.

    Raises:
        BrainITError: the file is missing or unreadable, a variable is missing, or the variables
            disagree (an index out of range, shared columns that are not ``sharedix``, unequal sessions).
    """
    path = Path(path)
    require(path.is_file(), f"NSD experimental design {path} not found")
    mat = _load_mat(path)
    for key in ("masterordering", "subjectim", "sharedix"):
        require(key in mat, f"{path} lacks the variable {key!r} (found {sorted(mat)})")
    order = mat["masterordering"].astype(np.int64).ravel()
    subjectim = np.atleast_2d(mat["subjectim"].astype(np.int64))
    sharedix = mat["sharedix"].astype(np.int64).ravel()
    n_images, n_shared = subjectim.shape[1], len(sharedix)
    require(
        order.size > 0 and order.min() >= 1 and order.max() <= n_images,
        f"{path}: masterordering must hold 1-based columns of subjectim (1..{n_images}), "
        f"found {order.min() if order.size else 'nothing'}..{order.max() if order.size else ''}",
    )
    require(
        0 < n_shared <= n_images, f"{path}: sharedix has {n_shared} images, subjectim only {n_images} columns"
    )
    shared_set = np.sort(sharedix)
    for s, row in enumerate(subjectim):
        require(
            np.array_equal(np.sort(row[:n_shared]), shared_set),
            f"{path}: the first {n_shared} columns of subjectim for subject {s + 1} are not the sharedix images",
        )
    tps = NSD_TRIALS_PER_SESSION
    if "stimpattern" in mat:  # (sessions, runs, trials per run) of 0/1: 1 = a stimulus trial
        pattern = mat["stimpattern"]
        per_session = pattern.reshape(pattern.shape[0], -1).sum(axis=1).astype(np.int64)
        per_session = per_session[per_session > 0]
        require(
            len(per_session) > 0 and (per_session == per_session[0]).all(),
            f"{path}: stimpattern gives unequal trials per session {sorted(set(per_session.tolist()))}",
        )
        tps = int(per_session[0])
    require(
        len(order) % tps == 0,
        f"{path}: masterordering has {len(order)} trials, not a multiple of {tps} trials per session",
    )
    return ExpDesign(order, subjectim, sharedix, tps)
