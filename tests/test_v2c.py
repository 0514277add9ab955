"""V2C: GMM voxel clusters, cluster table, nearest-neighbour mapping, clusters.npz, `brainit-pl cluster`."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainit_pl.cli import run_project_command
from brainit_pl.data.store import Store
from brainit_pl.errors import BrainITError
from brainit_pl.models.v2c import (
    ClusterMap,
    VoxelClusters,
    cluster_agreement,
    cluster_table,
    labels_from_table,
    load_clusters,
    save_clusters,
)

REFERENCE = Path(__file__).parent / "data" / "brainit_reference.npz"


def _truth(nsd: Path, store: Store) -> tuple[np.ndarray, np.ndarray]:
    """Pooled true types (V,) and coordinates (V, 3) of the simulated subjects, in global voxel order."""
    types = [np.load(nsd / "simulation" / f"subj{s:02d}.npz")["type"] for s in store.subjects]
    return np.concatenate(types).astype(np.int64), np.concatenate(
        [store.subject(s).xyz for s in store.subjects]
    )


def _type_embeddings(types: np.ndarray, dim: int = 16, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """Stand-in encoder embeddings that carry the true type: a random centre per type plus noise (V, dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(types.max() + 1, dim))
    return centres[types] + noise * rng.normal(size=(len(types), dim))


def test_every_voxel_gets_one_cluster_and_seed_fixes_labels():
    x = np.random.default_rng(1).normal(size=(97, 5))
    a = VoxelClusters(n_clusters=7, covariance_type="diag", seed=3).fit(x)
    assert a.labels_.shape == (97,) and a.labels_.dtype == np.int64
    assert a.labels_.min() >= 0 and a.labels_.max() < 7
    assert np.allclose(np.linalg.norm(a.reference_, axis=1), 1.0)  # functional rows are L2-normalised
    b = VoxelClusters(n_clusters=7, covariance_type="diag", seed=3).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.predict(x), a.labels_)
    table = cluster_table(a.labels_, 7)
    assert sorted(table[table >= 0].tolist()) == list(range(97))  # each voxel in exactly one member list


def test_cluster_table_round_trip_and_reference():
    labels = np.array([2, 0, 2, 2, 4, 0, 1])  # cluster 3 is empty
    table = cluster_table(labels, 5)
    np.testing.assert_array_equal(table, [[1, 5, -1], [6, -1, -1], [0, 2, 3], [-1, -1, -1], [4, -1, -1]])
    np.testing.assert_array_equal(labels_from_table(table, 7), labels)
    ref = np.load(REFERENCE)
    cov, tab = ref["bit/cluster_of_voxel"], ref["bit/cluster_table"]
    np.testing.assert_array_equal(cluster_table(cov, tab.shape[0]), tab)
    np.testing.assert_array_equal(labels_from_table(tab, len(cov)), cov)
    with pytest.raises(BrainITError, match="exactly once"):
        labels_from_table(np.array([[0, 1], [1, -1]]), 2)


def test_nearest_neighbour_mapping_is_cosine_and_returns_global_ids():
    # Reference voxels 0..3 (say subject 1 = rows 0-1, subject 2 = rows 2-3), four directions.
    ref = np.array([[0.1, 0.0], [3.0, 3.0], [0.0, -2.0], [-1.0, 0.2]])
    model = VoxelClusters(n_clusters=4, covariance_type="spherical", seed=0).fit(ref)
    new = np.array([[4.0, 1.0], [0.2, 0.25], [0.01, -5.0], [-3.0, 0.0]])
    labels, ids = model.map_new_voxels(new)
    # [4, 1] is 14 degrees from voxel 0 but 31 from voxel 1: cosine picks 0 (raw Euclidean would pick 1).
    np.testing.assert_array_equal(ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(labels, model.labels_[[0, 1, 2, 3]])
    with pytest.raises(BrainITError, match="3 dimensions, but the clusters were fitted on 2"):
        model.map_new_voxels(np.ones((2, 3)))


def test_bad_input_is_one_clear_error():
    with pytest.raises(BrainITError, match="cannot make 10 clusters from 5 voxels"):
        VoxelClusters(n_clusters=10).fit(np.ones((5, 3)))
    x = np.random.default_rng(0).normal(size=(20, 4))
    x[7, 2] = np.nan
    with pytest.raises(BrainITError, match="NaN or inf.*row 7"):
        VoxelClusters(n_clusters=2).fit(x)
    with pytest.raises(BrainITError, match="all-zero"):
        VoxelClusters(n_clusters=2).fit(np.zeros((20, 4)))
    with pytest.raises(BrainITError, match="not fitted"):
        VoxelClusters(n_clusters=2).predict(np.ones((2, 4)))
    with pytest.raises(BrainITError, match="covariance_type"):
        VoxelClusters(covariance_type="banana")


def test_functional_clusters_recover_types_better_than_anatomical(tiny_nsd, tiny_store):
    types, xyz = _truth(tiny_nsd, Store(tiny_store))
    k = int(types.max()) + 1
    assert cluster_agreement(types, types) == 1.0
    assert cluster_agreement((types + 3) % k, types) == 1.0  # label names do not matter
    functional = VoxelClusters(n_clusters=k, covariance_type="full", seed=0).fit(_type_embeddings(types))
    anatomical = VoxelClusters(n_clusters=k, covariance_type="full", seed=0, kind="anatomical").fit(xyz)
    ari_f, ari_a = cluster_agreement(functional.labels_, types), cluster_agreement(anatomical.labels_, types)
    assert ari_f > 0.4 and ari_a < 0.2 and ari_f > ari_a + 0.3, (ari_f, ari_a)
    # the anatomical transform keeps mm proportions: one scale for all axes
    assert np.isscalar(anatomical.scale_) and np.allclose(anatomical.reference_.std(), 1.0)


def test_save_load_validates_against_voxel_counts(tmp_path):
    cm = ClusterMap(np.array([0, 1, 1, 2, 0, 2, 1]), {1: 4, 5: 3}, n_clusters=3, kind="functional", seed=4)
    save_clusters(tmp_path / "clusters.npz", cm)
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.npz"]  # no temporary left behind
    back = load_clusters(tmp_path / "clusters.npz", {5: 3, 1: 4})
    np.testing.assert_array_equal(back.cluster_of_voxel, cm.cluster_of_voxel)
    assert (back.n_voxels, back.n_clusters, back.kind, back.seed) == ({1: 4, 5: 3}, 3, "functional", 4)
    np.testing.assert_array_equal(back.cluster_table, [[0, 4, -1], [1, 2, 6], [3, 5, -1]])
    only5 = load_clusters(tmp_path / "clusters.npz", {5: 3})  # a subset: renumbered over that subset
    np.testing.assert_array_equal(only5.cluster_of_voxel, [0, 2, 1])
    with pytest.raises(BrainITError, match=r"\{1: 4, 5: 3\}.*\{1: 4, 5: 2\}"):
        load_clusters(tmp_path / "clusters.npz", {1: 4, 5: 2})
    with pytest.raises(BrainITError, match="not found"):
        load_clusters(tmp_path / "nope.npz")


def _fake_checkpoint(path: Path, embeddings: np.ndarray, n_voxels: dict[int, int]) -> Path:
    """What an encoder Lightning checkpoint holds for V2C (the contract with lit/encoder.py)."""
    state = {
        "encoder.voxel_embed.weight": torch.from_numpy(embeddings).float(),
        "encoder.other": torch.ones(2),
    }
    torch.save({"state_dict": state, "hyper_parameters": {"n_voxels": n_voxels}}, path)
    return path


def test_cluster_job_end_to_end(tiny_nsd, tiny_store, tmp_path, stderr_lines):
    store = Store(tiny_store)
    types, _ = _truth(tiny_nsd, store)
    n_voxels = {s: store.subject(s).n_voxels for s in store.subjects}
    ckpt = _fake_checkpoint(tmp_path / "encoder.ckpt", _type_embeddings(types), n_voxels)
    out = tmp_path / "v2c"
    argv = ["--embeddings", str(ckpt), "--store", str(tiny_store), "--out", str(out), "--clusters", "25"]
    argv += ["--covariance", "diag", "--truth", str(tiny_nsd), "--tensorboard"]
    assert run_project_command("cluster", argv) == 0

    clusters = load_clusters(out / "clusters.npz", n_voxels)
    assert clusters.kind == "functional" and clusters.n_clusters == 25
    rows = list(csv.DictReader((out / "cluster_sizes.csv").open()))
    assert len(rows) == 25 and sum(int(r["n_voxels"]) for r in rows) == sum(n_voxels.values())
    assert all(int(r["n_voxels"]) == sum(int(r[f"subj{s:02d}"]) for s in n_voxels) for r in rows)
    for s in n_voxels:
        png = out / f"clusters_subj{s:02d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (events,) = (out / "tb").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert {f"v2c/clusters_subj{s:02d}" for s in n_voxels} <= set(
        EventAccumulator(str(events)).Reload().Tags()["images"]
    )
    report = json.loads((out / "agreement.json").read_text())
    assert set(report["ari"]["per_subject"]) == {str(s) for s in n_voxels}
    assert report["ari"]["pooled"] > report["anatomical_baseline_ari"]["pooled"] + 0.3

    # anatomical, from coordinates alone (no embeddings), no pictures
    out_a = tmp_path / "anat"
    argv = ["--kind", "anatomical", "--store", str(tiny_store), "--out", str(out_a), "--clusters", "8"]
    assert run_project_command("cluster", [*argv, "--no-plots"]) == 0
    assert load_clusters(out_a / "clusters.npz", n_voxels).kind == "anatomical"
    assert not list(out_a.glob("*.png"))


def test_cluster_job_user_errors_write_nothing(tiny_store, tmp_path, stderr_lines):
    store = Store(tiny_store)
    n_voxels = {s: store.subject(s).n_voxels for s in store.subjects}
    total = sum(n_voxels.values())
    emb = np.random.default_rng(0).normal(size=(total, 4))
    out = tmp_path / "v2c"
    base = ["--store", str(tiny_store), "--out", str(out), "--no-plots"]

    ckpt = _fake_checkpoint(tmp_path / "enc.ckpt", emb, n_voxels)
    assert (
        run_project_command("cluster", [*base, "--embeddings", str(ckpt), "--clusters", str(total + 1)]) == 2
    )
    assert stderr_lines() == [
        f"brainit-pl cluster: error: cannot make {total + 1} clusters from {total} voxels; "
        f"choose --clusters <= {total}"
    ]
    wrong = {s: v + (s == store.subjects[0]) for s, v in n_voxels.items()}  # one voxel too many
    np.savez(
        tmp_path / "emb.npz",
        embeddings=np.ones((total + 1, 4)),
        subjects=list(wrong),
        n_voxels=list(wrong.values()),
    )
    assert run_project_command("cluster", [*base, "--embeddings", str(tmp_path / "emb.npz")]) == 2
    (line,) = stderr_lines()
    assert f"embeddings cover {wrong[store.subjects[0]]} voxels but the store" in line
    assert run_project_command("cluster", base) == 2  # functional without embeddings
    assert "needs --embeddings" in stderr_lines()[0]
    assert not out.exists() or not list(out.iterdir())
