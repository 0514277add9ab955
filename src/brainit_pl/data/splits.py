"""Which store rows make up each split, and which rows make up each sample: pure index bookkeeping.

Nothing here reads betas; it works on a subject's trial table (the ``trials/*`` fields of the store,
see :mod:`brainit_pl.data.store`), so every rule below is testable on a few numpy arrays.

Rules (docs/method.md §1, data/README.md):

* **test** = every trial whose image is in the shared set (``trials/shared``), from *all* sessions in
  the store, whatever ``hours`` says: that is how the published limited-data (1 h) numbers are measured.
  Test images never enter train or val.
* **hours** selects the train/val trials: ``None`` → every session; ``hours >= 1`` → the first
  ``round(hours)`` sessions; ``0 < hours < 1`` → the first ``round(hours · trials_per_session)`` trials
  of the first session, in session order (30 / 15 min = the first half / quarter of session 1).
* **val / train**: the selected non-shared trials are split by *image* (never by trial, so no repeat of
  a val image lands in train): ``val_fraction`` of the images (at least one when there are any and the
  fraction is positive), drawn with ``seed`` and the subject number, go to val; the rest to train.
* a **sample** is one image of one subject: with averaging, all its trials in the split are averaged
  (mean over the available repeats); without, each trial is its own sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from brainit_pl.errors import require

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SampleTable:
    """The samples of one split, as flat arrays (cheap to pickle into worker processes).

    Sample ``i`` averages the store rows ``rows[row_ptr[i]:row_ptr[i + 1]]`` of subject ``subject[i]``.

    Attributes:
        subject: (N,) int64 subject of each sample.
        nsd_id: (N,) int64 0-based 73k image id of each sample.
        row_ptr: (N + 1,) int64 offsets into ``rows`` (CSR layout).
        rows: (R,) int64 store rows (trials) of all samples, each sample's rows in presentation order.
    """

    subject: np.ndarray
    nsd_id: np.ndarray
    row_ptr: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.subject)

    @property
    def n_repeats(self) -> np.ndarray:
        """(N,) int64 number of trials averaged into each sample."""
        return np.diff(self.row_ptr)

    def rows_of(self, i: int) -> np.ndarray:
        """Store rows of sample ``i``."""
        return self.rows[self.row_ptr[i] : self.row_ptr[i + 1]]

    @staticmethod
    def concat(tables: Sequence[SampleTable]) -> SampleTable:
        """Stack the samples of several tables (e.g. one per subject), in the order given."""
        if not tables:
            return make_samples(0, np.zeros(0, np.int64), np.zeros(0, np.int64), average=False)
        offsets = np.cumsum([0] + [len(t.rows) for t in tables])
        ptr = np.concatenate([[0]] + [t.row_ptr[1:] + off for t, off in zip(tables, offsets)])
        return SampleTable(
            subject=np.concatenate([t.subject for t in tables]),
            nsd_id=np.concatenate([t.nsd_id for t in tables]),
            row_ptr=ptr.astype(np.int64),
            rows=np.concatenate([t.rows for t in tables]),
        )


@dataclass(frozen=True)
class SubjectSplit:
    """One subject's split, before it becomes samples.

    Attributes:
        subject: the subject number.
        selected: (n,) int64 rows chosen by ``hours`` (all of them, shared ones included), session order.
        train, val, test: (n_split,) int64 store rows of each split, in presentation order.
    """

    subject: int
    selected: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def rows(self, split: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def session_order(trials: Mapping[str, np.ndarray]) -> np.ndarray:
    """All store rows sorted by (session, trial within session) → (T,) int64."""
    return np.lexsort((trials["trial"], trials["session"])).astype(np.int64)


def hour_subset(
    trials: Mapping[str, np.ndarray], trials_per_session: int, hours: float | None, subject: int
) -> np.ndarray:
    """Rows of the first ``hours`` of scanning (shared trials included), in session order → (n,) int64.

    Args:
        trials: the subject's trial table (needs ``session`` and ``trial``).
        trials_per_session: trials in one NSD session (750 in NSD).
        hours: ``None`` (everything), ``>= 1`` (the first ``round(hours)`` sessions) or in (0, 1) (the first
            ``round(hours · trials_per_session)`` trials of the first session).
        subject: only for error messages.

    Raises:
        BrainITError: ``hours <= 0``, or more sessions asked for than the subject has in the store.
    """
    order = session_order(trials)
    if hours is None:
        return order
    require(hours > 0, f"hours must be positive (or null for all sessions), got {hours}")
    sessions = np.unique(trials["session"])  # sorted
    in_order = np.asarray(trials["session"])[order]
    if hours >= 1:
        n = int(round(hours))
        require(
            n <= len(sessions),
            f"hours={hours} needs {n} sessions, but subject {subject} has {len(sessions)} in the store",
        )
        return order[np.isin(in_order, sessions[:n])]
    first = order[in_order == sessions[0]]
    return first[: int(round(hours * trials_per_session))]


def split_subject(
    subject: int,
    trials: Mapping[str, np.ndarray],
    trials_per_session: int,
    *,
    hours: float | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> SubjectSplit:
    """Split one subject's trials into train / val / test rows (rules in the module docstring).

    Args:
        subject: the subject number (also seeds the val draw, so subjects get independent draws).
        trials: the subject's trial table (``nsd_id``, ``session``, ``trial``, ``shared``), each (T,).
        trials_per_session: trials in one session.
        hours: the limited-data subset for train/val (see :func:`hour_subset`).
        val_fraction: fraction of the selected non-shared images held out for validation, in [0, 1).
        seed: seed of the val draw.
    """
    require(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
    nsd_id = np.asarray(trials["nsd_id"], dtype=np.int64)
    shared = np.asarray(trials["shared"], dtype=bool)
    selected = hour_subset(trials, trials_per_session, hours, subject)
    trainval = selected[~shared[selected]]
    images = np.unique(nsd_id[trainval])
    n_val = 0 if val_fraction == 0 or len(images) == 0 else max(1, int(round(val_fraction * len(images))))
    # SeedSequence mixes (seed, subject): the same seed gives each subject its own, reproducible draw.
    rng = np.random.default_rng([seed, subject])
    val_images = rng.choice(images, size=n_val, replace=False)
    is_val = np.isin(nsd_id[trainval], val_images)
    test = session_order(trials)
    return SubjectSplit(
        subject=subject,
        selected=selected,
        train=trainval[~is_val],
        val=trainval[is_val],
        test=test[shared[test]],
    )


def make_samples(subject: int, rows: np.ndarray, nsd_id: np.ndarray, *, average: bool) -> SampleTable:
    """Turn a split's rows into samples: one per image (``average``) or one per trial.

    Args:
        subject: the subject of every row.
        rows: (n,) int64 store rows, in presentation order.
        nsd_id: (T,) the subject's whole ``trials/nsd_id`` column (indexed by row).
        average: group the rows of each image into one sample (ordered by 73k id); otherwise one sample
            per row, in the order given.
    """
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.asarray(nsd_id, dtype=np.int64)[rows]
    if average:
        # A stable sort keeps each image's repeats in presentation order.
        order = np.argsort(ids, kind="stable")
        rows, ids = rows[order], ids[order]
        uniq, starts = np.unique(ids, return_index=True)
        ptr = np.append(starts, len(rows)).astype(np.int64)
        ids = uniq
    else:
        ptr = np.arange(len(rows) + 1, dtype=np.int64)
    return SampleTable(subject=np.full(len(ids), subject, dtype=np.int64), nsd_id=ids, row_ptr=ptr, rows=rows)
