"""The experiment design of the simulated NSD, built the way NSD's is, and the files that describe it.

* Image ids (0-based "73k ids") ``0 .. n_images - 1`` are shuffled into a shared set (seen by every
  subject) and one own set per subject. ``subjectim`` (n_subjects, n_images_per_subject) holds 1-based
  ids; its first ``n_shared`` columns are ``sharedix`` (the shared ids, sorted), the same for everyone.
* ``masterordering`` (1, max_sessions x trials_per_session) lists, per trial slot, the 1-based column of
  ``subjectim`` shown; it is shared by all subjects (subjects with fewer sessions stop earlier). Each
  column appears 3 times: the first presentation at a uniformly random time, each repeat after a
  log-uniform lag (from ~5 trials to the whole experiment), then all 3 x n presentations are sorted by time.
* ``stimpattern`` (max_sessions, runs, slots_per_run) is 1 where a slot shows a stimulus, 0 for a blank
  trial; the first slot of every run is blank and the rest of the blanks are random. The stimulus
  trials are split over the runs as evenly as possible (NSD: 63/62 alternating, 75 slots).
* ``responses.tsv`` has one row per trial: SUBJECT, SESSION, RUN (1-based within the session), TRIAL
  (1-based within the run, as in NSD), 73KID (1-based), 10KID (the ``masterordering`` value) and ISOLD
  (1 if the image was shown before).
* ``nsd_stim_info_merged.csv`` mirrors NSD's (including its unnamed leading index column): ``nsdId``,
  ``cocoId`` (a made-up positive id), ``cocoSplit``, ``cropBox``, ``shared1000``, ``subjectK`` (1 if the
  image is in the subject's ``subjectim`` row) and ``subjectK_repR`` (1-based global trial number of the
  R-th presentation, 0 if that presentation falls after the subject's last session).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainit_pl.data.sim.presets import N_REPEATS, SimPreset


@dataclass
class Design:
    """NSD's bookkeeping arrays (1-based values, as in ``nsd_expdesign.mat``)."""

    masterordering: np.ndarray  # (max_sessions * trials_per_session,) int, values 1..n_images_per_subject
    subjectim: np.ndarray  # (n_subjects, n_images_per_subject) int, 1-based 73k ids
    sharedix: np.ndarray  # (n_shared,) int, 1-based 73k ids, sorted
    stimpattern: np.ndarray  # (max_sessions, runs, slots_per_run) uint8


def build_design(preset: SimPreset, rng: np.random.Generator) -> Design:
    """Draw the whole experiment design of ``preset``."""
    n_img, n_sh = preset.n_images_per_subject, preset.n_shared
    ids = rng.permutation(preset.n_images) + 1  # 1-based
    shared = np.sort(ids[:n_sh])
    subjectim = np.empty((preset.n_subjects, n_img), np.int64)
    for s in range(preset.n_subjects):
        own = ids[n_sh + s * preset.n_own : n_sh + (s + 1) * preset.n_own]
        subjectim[s] = np.concatenate([shared, own])

    # presentation times: first at U(0, 1), repeats after log-uniform lags; sort all 3n events
    first = rng.uniform(0.0, 1.0, n_img)
    shortest = min(0.5, max(1e-3, 5.0 / (N_REPEATS * n_img)))  # at least ~5 trials apart, as in NSD
    lags = np.exp(rng.uniform(np.log(shortest), np.log(1.0), (n_img, N_REPEATS - 1)))
    times = np.concatenate([first[:, None], first[:, None] + np.cumsum(lags, axis=1)], axis=1)
    order = np.argsort(times.ravel(), kind="stable")
    masterordering = (order // N_REPEATS) + 1  # the image column of each event, in time order

    runs, per_run = preset.runs_per_session, preset.trials_per_session // preset.runs_per_session
    counts = np.full(runs, per_run)
    counts[: preset.trials_per_session - per_run * runs] += 1  # the first runs take the remainder
    slots = int(counts.max()) + preset.blanks_per_run
    pattern = np.zeros((preset.n_sessions_max, runs, slots), np.uint8)
    for s in range(preset.n_sessions_max):
        for r in range(runs):
            on = 1 + rng.choice(slots - 1, size=int(counts[r]), replace=False)  # slot 0 stays blank
            pattern[s, r, on] = 1
    return Design(masterordering, subjectim, shared, pattern)


def trial_table(design: Design, preset: SimPreset, subject: int) -> dict[str, np.ndarray]:
    """One row per trial the subject did, in presentation order.

    Returns:
        Arrays of length T = sessions x trials_per_session: ``session`` (1-based), ``run`` (1-based),
        ``trial_in_run`` (1-based), ``trial`` (0-based within the session), ``global_trial`` (0-based),
        ``column`` (1-based ``masterordering`` value), ``nsd_id`` (0-based), ``repeat`` (0, 1, 2).
    """
    tps = preset.trials_per_session
    n = preset.sessions[subject - 1] * tps
    g = np.arange(n)
    column = design.masterordering[:n]
    run_of_trial = np.concatenate(
        [np.full(int(c), r + 1) for r, c in enumerate(design.stimpattern[0].sum(1))]
    )
    within = np.concatenate([np.arange(1, int(c) + 1) for c in design.stimpattern[0].sum(1)])
    repeat = np.zeros(n, np.int64)
    seen: dict[int, int] = {}
    for i, c in enumerate(column.tolist()):
        repeat[i] = seen.get(c, 0)
        seen[c] = repeat[i] + 1
    return {
        "session": g // tps + 1,
        "run": np.tile(run_of_trial, n // tps),
        "trial_in_run": np.tile(within, n // tps),
        "trial": g % tps,
        "global_trial": g,
        "column": column,
        "nsd_id": design.subjectim[subject - 1, column - 1] - 1,
        "repeat": repeat,
    }


def write_expdesign(path: Path, design: Design) -> None:
    """``nsd_expdesign.mat`` with NSD's variable names and (row-vector) shapes."""
    from scipy.io import savemat

    with open(path, "wb") as f:  # the whole tree is renamed into place at once: no per-file temporary
        savemat(f, {
            "masterordering": design.masterordering[None, :].astype(np.float64),
            "subjectim": design.subjectim.astype(np.float64),
            "sharedix": design.sharedix[None, :].astype(np.float64),
            "stimpattern": design.stimpattern.astype(np.float64),
        })  # fmt: skip


def write_responses(path: Path, table: dict[str, np.ndarray], subject: int) -> None:
    """``responses.tsv`` of one subject (tab-separated, header line, one row per trial)."""
    import pandas as pd

    frame = pd.DataFrame({
        "SUBJECT": subject,
        "SESSION": table["session"],
        "RUN": table["run"],
        "TRIAL": table["trial_in_run"],
        "73KID": table["nsd_id"] + 1,
        "10KID": table["column"],
        "ISOLD": (table["repeat"] > 0).astype(int),
    })  # fmt: skip
    frame.to_csv(path, sep="\t", index=False)


def write_stim_info(path: Path, design: Design, preset: SimPreset, rng: np.random.Generator) -> None:
    """``nsd_stim_info_merged.csv`` for all ``preset.n_images`` images."""
    import pandas as pd

    n = preset.n_images
    coco = rng.choice(np.arange(1, 600_000), size=n, replace=False)
    cols: dict[str, object] = {
        "cocoId": coco,
        "cocoSplit": np.where(rng.random(n) < 0.9, "train2017", "val2017"),
        "cropBox": ["(0, 0, 0, 0)"] * n,  # the simulated stimuli are drawn square: nothing cropped
        "nsdId": np.arange(n),
        "shared1000": np.isin(np.arange(n) + 1, design.sharedix),
    }
    for s in range(preset.n_subjects):
        seen = np.zeros(n, np.int64)
        seen[design.subjectim[s] - 1] = 1
        cols[f"subject{s + 1}"] = seen
        table = trial_table(design, preset, s + 1)
        for r in range(N_REPEATS):
            rep = np.zeros(n, np.int64)
            hit = table["repeat"] == r
            rep[table["nsd_id"][hit]] = table["global_trial"][hit] + 1
            cols[f"subject{s + 1}_rep{r}"] = rep
    pd.DataFrame(cols).to_csv(path, index=True)
