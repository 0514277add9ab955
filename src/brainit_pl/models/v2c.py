"""V2C: voxel-to-cluster mapping, shared by all subjects (Brain-IT §3).

Every voxel of every training subject gets one hard *functional cluster*: a Gaussian mixture is fitted
to the L2-normalised voxel embeddings of the Universal Brain Encoder, and ``predict`` labels each voxel.
The *anatomical* baseline runs the same pipeline on voxel coordinates. A new subject's voxels take the
cluster of their nearest reference voxel (and the BIT initialises their voxel embedding from that
neighbour's), so no refit is needed.

Voxels are rows in *global* order: row ``voxel_offsets[s] + i`` is voxel ``i`` of subject ``s``, with
subjects in sorted order (as in :class:`~brainit_pl.data.datamodule.NSDDataModule`). The BIT reads the
result as ``cluster_of_voxel`` (total voxels,) or as :func:`cluster_table` (K, max members), from the
``clusters.npz`` written by :func:`save_clusters` (``brainit-pl cluster``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path

log = logging.getLogger(__name__)

Kind = Literal["functional", "anatomical"]
KINDS: tuple[str, ...] = ("functional", "anatomical")
COVARIANCE_TYPES: tuple[str, ...] = ("full", "tied", "diag", "spherical")
FORMAT_NAME = "brainit-pl-clusters"
FORMAT_VERSION = 1


def _check_features(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    require(x.ndim == 2 and len(x) > 0, f"{what} must be a non-empty (V, D) array, got shape {x.shape}")
    require(
        dim is None or x.shape[1] == dim,
        f"{what} have {x.shape[1]} dimensions, but the clusters were fitted on {dim}",
    )
    bad = ~np.isfinite(x).all(axis=1)
    require(not bad.any(), f"{what}: {int(bad.sum())} row(s) contain NaN or inf (first: row {bad.argmax()})")
    return x


def l2_normalise(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows of ``x`` (V, D) scaled to unit length; a zero row is an error (it has no direction)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (V, 1)
    zero = norms[:, 0] == 0
    require(not zero.any(), f"{what}: {int(zero.sum())} all-zero row(s) cannot be L2-normalised")
    return x / norms


def nearest_reference(
    new: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each new row's nearest reference row (Euclidean) and that row's label.

    On L2-normalised rows, Euclidean nearest = cosine nearest. sklearn's ``NearestNeighbors`` rather than
    a hand-written torch matmul: it picks a k-d tree for 3-D coordinates and brute force in chunks
    (bounded memory) for 256-d embeddings, and it is exact in both.

    Args:
        new: (V_new, D) transformed new voxels.
        reference: (V, D) transformed reference voxels; row = global voxel id.
        reference_labels: (V,) cluster of each reference voxel.

    Returns:
        labels (V_new,) int64 and neighbour ids (V_new,) int64 (row of ``reference``).
    """
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=1).fit(reference)
    ids = nn.kneighbors(new, return_distance=False)[:, 0].astype(np.int64)  # (V_new,)
    return np.asarray(reference_labels, dtype=np.int64)[ids], ids


class VoxelClusters:
    """Hard Gaussian-mixture clusters of voxels (sklearn style: ``fit``, then fitted state ending in ``_``).

    Args:
        n_clusters: K, the number of mixture components (Brain-IT: 128).
        covariance_type: sklearn's ``full`` (the paper's), ``tied``, ``diag`` or ``spherical``.
        seed: random state of the k-means initialisation (the result is deterministic under it).
        max_iter: EM iterations at most.
        n_init: initialisations; the best likelihood is kept.
        kind: ``functional`` rows are L2-normalised embeddings; ``anatomical`` rows are coordinates in
            mm, centred and divided by one common scale (their pooled standard deviation), so all axes
            keep their mm proportions (per-axis z-scoring would stretch the brain's short axis) while the
            numbers sit near unit size, where ``reg_covar`` and the k-means tolerance are meant to work.
        reg_covar: added to covariance diagonals (sklearn's default 1e-6).

    Attributes:
        labels_: (V,) int64 cluster of every fitted voxel, in [0, K).
        gmm_: the fitted ``sklearn.mixture.GaussianMixture``.
        reference_: (V, D) the transformed fitted rows (normalised embeddings or scaled coordinates).
        center_, scale_: the anatomical transform ((D,) and a float; zeros and 1 for functional).
    """

    def __init__(
        self,
        n_clusters: int = 128,
        covariance_type: str = "full",
        seed: int = 0,
        max_iter: int = 100,
        n_init: int = 1,
        kind: Kind = "functional",
        reg_covar: float = 1e-6,
    ) -> None:
        require(n_clusters >= 1, f"the number of clusters must be at least 1, got {n_clusters}")
        require(
            covariance_type in COVARIANCE_TYPES,
            f"covariance_type {covariance_type!r} is not one of {COVARIANCE_TYPES}",
        )
        require(kind in KINDS, f"cluster kind {kind!r} is not one of {KINDS}")
        self.n_clusters, self.covariance_type, self.seed = n_clusters, covariance_type, seed
        self.max_iter, self.n_init, self.kind, self.reg_covar = max_iter, n_init, kind, reg_covar

    def _transform(self, x: np.ndarray, what: str) -> np.ndarray:
        if self.kind == "functional":
            return l2_normalise(x, what)
        return (x - self.center_) / self.scale_

    def fit(self, embeddings: np.ndarray) -> VoxelClusters:
        """Fit the mixture to ``embeddings`` (V, D) (coordinates (V, 3) for ``anatomical``) and label them.

        Raises:
            BrainITError: K > V, NaN/inf or all-zero rows, or a mixture sklearn cannot fit.
        """
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        x = _check_features(embeddings, f"{self.kind} features")
        require(
            self.n_clusters <= len(x),
            f"cannot make {self.n_clusters} clusters from {len(x)} voxels; choose --clusters <= {len(x)}",
        )
        self.center_, self.scale_ = np.zeros(x.shape[1]), 1.0
        if self.kind == "anatomical":
            self.center_ = x.mean(axis=0)
            self.scale_ = float((x - self.center_).std()) or 1.0
        self.reference_ = self._transform(x, f"{self.kind} features")  # (V, D)
        self.gmm_ = GaussianMixture(
            n_components=self.n_clusters,
            covariance_type=self.covariance_type,
            max_iter=self.max_iter,
            n_init=self.n_init,
            init_params="kmeans",
            reg_covar=self.reg_covar,
            random_state=self.seed,
        )
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                self.gmm_.fit(self.reference_)
            except ValueError as err:  # ill-defined covariance: a component collapsed onto few voxels
                raise BrainITError(
                    f"the Gaussian mixture ({self.n_clusters} clusters, {self.covariance_type} covariance, "
                    f"{len(x)} voxels x {x.shape[1]} dims) could not be fitted ({err}); use fewer clusters, "
                    "a simpler covariance type or a larger reg_covar"
                ) from err
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.warning("the Gaussian mixture did not converge in %d EM iterations", self.max_iter)
        self.labels_ = self.gmm_.predict(self.reference_).astype(np.int64)  # (V,)
        log.info(
            "fitted %d %s clusters (%s covariance) on %d voxels x %d dims in %.1f s, %d EM iterations",
            self.n_clusters, self.kind, self.covariance_type, len(x), x.shape[1],
            time.perf_counter() - start, self.gmm_.n_iter_,
        )  # fmt: skip
        return self

    def _require_fitted(self) -> None:
        require(hasattr(self, "gmm_"), "VoxelClusters is not fitted yet; call fit(embeddings) first")

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Mixture labels (V_new,) of new rows (V_new, D), transformed as the fitted ones."""
        self._require_fitted()
        x = _check_features(embeddings, "new voxel features", self.reference_.shape[1])
        return self.gmm_.predict(self._transform(x, "new voxel features")).astype(np.int64)

    def map_new_voxels(self, new_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A new subject's voxels → (labels (V_new,), neighbour_global_ids (V_new,)).

        Each new voxel takes the label of its nearest reference voxel (cosine on normalised embeddings;
        Euclidean on scaled coordinates), and that voxel's global id (the reference row), from which the
        BIT initialises the new voxel's embedding.
        """
        self._require_fitted()
        x = _check_features(new_embeddings, "new voxel features", self.reference_.shape[1])
        return nearest_reference(self._transform(x, "new voxel features"), self.reference_, self.labels_)


def cluster_table(labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Member lists of each cluster → (K, max_members) int64, voxel ids ascending, padded with -1.

    Args:
        labels: (V,) cluster of each global voxel, in [0, K).
        n_clusters: K (empty clusters get an all -1 row).
    """
    labels = np.asarray(labels, dtype=np.int64)
    require(
        labels.ndim == 1 and bool(((labels >= 0) & (labels < n_clusters)).all()),
        f"cluster labels must be a (V,) array of values in [0, {n_clusters})",
    )
    sizes = np.bincount(labels, minlength=n_clusters)  # (K,)
    table = np.full((n_clusters, max(int(sizes.max(initial=0)), 1)), -1, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # voxel ids grouped by cluster, ascending within each
    rank = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # position within cluster
    table[labels[order], rank] = order
    return table


def labels_from_table(table: np.ndarray, n_voxels: int) -> np.ndarray:
    """Inverse of :func:`cluster_table`: (K, M) padded member lists → (V,) labels (each voxel once)."""
    table = np.asarray(table, dtype=np.int64)
    k, members = np.nonzero(table >= 0)
    ids = table[k, members]
    counts = np.bincount(ids, minlength=n_voxels) if len(ids) else np.zeros(n_voxels, dtype=np.int64)
    require(
        len(counts) == n_voxels and bool((counts == 1).all()),
        f"the cluster table does not list each of the {n_voxels} voxels exactly once",
    )
    labels = np.empty(n_voxels, dtype=np.int64)
    labels[ids] = k
    return labels


def cluster_agreement(labels: np.ndarray, true_types: np.ndarray) -> float:
    """Adjusted Rand index of clusters (V,) vs known voxel types (V,): 1 = same partition, ~0 = chance."""
    from sklearn.metrics import adjusted_rand_score

    labels, true_types = np.asarray(labels), np.asarray(true_types)
    require(labels.shape == true_types.shape, f"{labels.shape} labels vs {true_types.shape} true types")
    return float(adjusted_rand_score(true_types, labels))


@dataclass
class ClusterMap:
    """The saved V2C result: one cluster per global voxel of the subjects it was made for.

    Attributes:
        cluster_of_voxel: (total_voxels,) int64 in [0, n_clusters).
        n_voxels: subject → voxel count, subjects in sorted order (their global voxel order).
    """

    cluster_of_voxel: np.ndarray
    n_voxels: dict[int, int]
    n_clusters: int
    kind: str
    seed: int

    @property
    def voxel_offsets(self) -> dict[int, int]:
        starts = np.cumsum([0, *self.n_voxels.values()])
        return {s: int(o) for s, o in zip(self.n_voxels, starts)}

    @property
    def cluster_table(self) -> np.ndarray:
        """(K, max_members) int64 global voxel ids of each cluster, padded with -1."""
        return cluster_table(self.cluster_of_voxel, self.n_clusters)

    def subject_labels(self, subject: int) -> np.ndarray:
        """(V_s,) clusters of one subject's voxels, in its store order."""
        start = self.voxel_offsets[subject]
        return self.cluster_of_voxel[start : start + self.n_voxels[subject]]


def save_clusters(path: str | os.PathLike, clusters: ClusterMap) -> None:
    """Write ``clusters.npz`` atomically (a reader never sees a half-written file)."""
    subjects = sorted(clusters.n_voxels)
    require(
        len(clusters.cluster_of_voxel) == sum(clusters.n_voxels.values()),
        f"{len(clusters.cluster_of_voxel)} labels for {sum(clusters.n_voxels.values())} voxels",
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz
        np.savez(
            f,
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            cluster_of_voxel=np.asarray(clusters.cluster_of_voxel, dtype=np.int64),
            subjects=np.asarray(subjects, dtype=np.int64),
            n_voxels=np.asarray([clusters.n_voxels[s] for s in subjects], dtype=np.int64),
            n_clusters=clusters.n_clusters,
            kind=clusters.kind,
            seed=clusters.seed,
        )


def load_clusters(path: str | os.PathLike, n_voxels: Mapping[int, int] | None = None) -> ClusterMap:
    """Read ``clusters.npz`` and check it fits the voxel table of ``n_voxels`` (e.g. a DataModule's).

    If ``n_voxels`` names a subset of the file's subjects with the same counts, the map is restricted to
    them (global ids renumbered over that subset, as the DataModule numbers them).

    Raises:
        BrainITError: a missing or foreign file, labels out of range, or voxel counts that differ.
    """
    path = Path(path)
    require(path.is_file(), f"cluster file {path} not found; make it with `brainit-pl cluster`")
    try:
        with np.load(path, allow_pickle=False) as f:
            require(str(f["format"]) == FORMAT_NAME, f"{path} is not a brainit-pl cluster file")
            found = int(f["format_version"])
            require(found == FORMAT_VERSION, f"{path} has cluster format {found}, expected {FORMAT_VERSION}")
            labels = f["cluster_of_voxel"].astype(np.int64)
            counts = dict(zip(f["subjects"].tolist(), f["n_voxels"].tolist()))
            out = ClusterMap(labels, counts, int(f["n_clusters"]), str(f["kind"]), int(f["seed"]))
    except (OSError, ValueError, KeyError) as err:
        raise BrainITError(f"{path} is not a readable brainit-pl cluster file ({err})") from err
    require(
        len(labels) == sum(counts.values()) and bool(((labels >= 0) & (labels < out.n_clusters)).all()),
        f"{path} is corrupt: {len(labels)} labels for {sum(counts.values())} voxels, K={out.n_clusters}",
    )
    if n_voxels is None:
        return out
    wanted = {int(s): int(v) for s, v in sorted(n_voxels.items())}
    require(
        all(counts.get(s) == v for s, v in wanted.items()),
        f"the clusters in {path} were made for voxel counts {counts} (subject: voxels), but the data has "
        f"{wanted}; re-run `brainit-pl cluster` for these subjects",
    )
    if wanted == counts:
        return out
    labels = np.concatenate([out.subject_labels(s) for s in wanted])
    return ClusterMap(labels, wanted, out.n_clusters, out.kind, out.seed)


def shared_voxel_table(models: Mapping[str, object]) -> dict[int, int]:
    """The voxel table (subject → count) shared by trained ``models`` (name → module with ``n_voxels``);
    where two of them hold a BIT (``.net.cluster_of_voxel``), their V2C clusters must agree too.

    Raises:
        BrainITError: two models of other voxel tables or other clusters (named, in one line).
    """
    import json

    import torch

    tables = {name: m.n_voxels for name, m in models.items()}
    require(
        len({json.dumps(sorted(t.items())) for t in tables.values()}) == 1,
        f"the models were trained on different voxel tables: {tables}",
    )
    labels = {
        name: net.cluster_of_voxel.cpu()
        for name, m in models.items()
        if (net := getattr(m, "net", None)) is not None and hasattr(net, "cluster_of_voxel")
    }
    if len(labels) > 1:
        (first, ref), *rest = labels.items()
        for name, other in rest:
            require(
                torch.equal(ref, other),
                f"the {name} model's V2C clusters differ from the {first} model's "
                f"({int((ref != other).sum())} of {len(ref)} voxels): both BITs must use the same clusters.npz",
            )
    return next(iter(tables.values()))
