"""Pure split bookkeeping: hour subsets, train/val/test rows, samples (no files)."""

import numpy as np
import pytest

from brainit_pl.data.splits import SampleTable, hour_subset, make_samples, split_subject
from brainit_pl.errors import BrainITError

TPS = 8  # trials per session


def _table(n_sessions=3, seed=0):
    """Trials stored out of presentation order (rows shuffled), so sorting bugs show."""
    rng = np.random.default_rng(seed)
    n = n_sessions * TPS
    session = np.repeat(np.arange(1, n_sessions + 1), TPS)
    trial = np.tile(np.arange(TPS), n_sessions)
    nsd_id = rng.integers(0, 10, size=n) * 10  # 10 images (0, 10, ..., 90), 0-20 shared
    perm = rng.permutation(n)
    return {
        "session": session[perm],
        "trial": trial[perm],
        "nsd_id": nsd_id[perm],
        "shared": nsd_id[perm] < 30,
    }


def _keys(t, rows):
    return list(zip(t["session"][rows].tolist(), t["trial"][rows].tolist()))


def test_hour_subsets_in_session_order():
    t = _table()
    assert _keys(t, hour_subset(t, TPS, None, 1)) == [(s, i) for s in (1, 2, 3) for i in range(TPS)]
    assert _keys(t, hour_subset(t, TPS, 1, 1)) == [(1, i) for i in range(TPS)]
    assert _keys(t, hour_subset(t, TPS, 2, 1)) == [(s, i) for s in (1, 2) for i in range(TPS)]
    assert _keys(t, hour_subset(t, TPS, 0.5, 1)) == [(1, i) for i in range(4)]
    assert _keys(t, hour_subset(t, TPS, 0.25, 1)) == [(1, 0), (1, 1)]
    with pytest.raises(BrainITError, match="needs 4 sessions, but subject 5 has 3"):
        hour_subset(t, TPS, 4, 5)
    with pytest.raises(BrainITError, match="positive"):
        hour_subset(t, TPS, 0, 1)


def test_hours_count_sessions_present_not_session_numbers():
    t = _table()
    t["session"] = t["session"] + 10  # a store holding sessions 11-13 only
    assert _keys(t, hour_subset(t, TPS, 1, 1)) == [(11, i) for i in range(TPS)]


def test_split_by_image_test_is_shared():
    t = _table(n_sessions=3)
    split = split_subject(2, t, TPS, hours=2, val_fraction=0.3, seed=1)
    ids = t["nsd_id"]
    assert t["shared"][split.test].all() and len(split.test) == t["shared"].sum()  # all sessions
    assert set(t["session"][split.test]) == {1, 2, 3}
    assert not t["shared"][np.concatenate([split.train, split.val])].any()
    assert set(ids[split.train]).isdisjoint(ids[split.val])
    assert set(t["session"][np.concatenate([split.train, split.val])]) <= {1, 2}
    # train + val = every non-shared trial of the subset
    expect = [r for r in split.selected if not t["shared"][r]]
    assert sorted(np.concatenate([split.train, split.val])) == sorted(expect)
    n_images = len(np.unique(ids[expect]))
    assert len(np.unique(ids[split.val])) == max(1, round(0.3 * n_images))


def test_val_draw_seeded_per_subject():
    t = _table(n_sessions=3)
    a = split_subject(1, t, TPS, val_fraction=0.3, seed=0)
    assert np.array_equal(a.val, split_subject(1, t, TPS, val_fraction=0.3, seed=0).val)
    draws = {tuple(split_subject(1, t, TPS, val_fraction=0.3, seed=s).val) for s in range(6)}
    assert len(draws) > 1
    assert len(split_subject(1, t, TPS, val_fraction=0.0).val) == 0
    assert len(split_subject(1, t, TPS, val_fraction=0.01).val) > 0  # at least one image
    with pytest.raises(BrainITError, match="val_fraction"):
        split_subject(1, t, TPS, val_fraction=1.0)


def test_make_samples_average_and_keep():
    nsd_id = np.array([5, 3, 5, 9, 3, 5])
    rows = np.array([0, 1, 2, 4, 5])
    avg = make_samples(4, rows, nsd_id, average=True)
    assert avg.nsd_id.tolist() == [3, 5] and avg.subject.tolist() == [4, 4]
    assert [avg.rows_of(i).tolist() for i in range(2)] == [[1, 4], [0, 2, 5]]
    assert avg.n_repeats.tolist() == [2, 3]
    keep = make_samples(4, rows, nsd_id, average=False)
    assert keep.nsd_id.tolist() == [5, 3, 5, 3, 5] and keep.n_repeats.tolist() == [1] * 5
    both = SampleTable.concat([avg, make_samples(7, np.array([3]), nsd_id, average=True)])
    assert both.subject.tolist() == [4, 4, 7] and both.rows_of(2).tolist() == [3]
    assert both.rows_of(1).tolist() == [0, 2, 5]
    assert len(SampleTable.concat([])) == 0
