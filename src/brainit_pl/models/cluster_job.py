"""V2C: cluster the voxels of all training subjects into K functional clusters shared by all of them.

Functional clusters (the default) fit a Gaussian mixture to the L2-normalised voxel embeddings of a
Universal Encoder checkpoint (``encoder.voxel_embed.weight``, with ``hyper_parameters["n_voxels"]``), or
of a plain ``.npz`` (``embeddings`` (V, D), ``subjects`` (S,), ``n_voxels`` (S,)) / ``.npy`` (V, D) file
whose rows are the store's subjects in sorted order. Anatomical clusters (``--kind anatomical``, the
ablation baseline) fit the same mixture to the store's voxel coordinates (mm).

Writes into --out: ``clusters.npz`` (what the BIT reads; written last), ``cluster_sizes.csv``,
``clusters_subjNN.png`` (the clusters on the brain), and with ``--truth SIMROOT`` (a simulated NSD)
``agreement.json``: the adjusted Rand index of the clusters against the simulator's true voxel types,
per subject and pooled, next to the anatomical baseline's. ``--tensorboard`` also logs the maps under
``--out/tb``. No betas and no images are read here: test images can only reach the clusters through the
encoder's training, which excludes them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brainit_pl.data.store import Store
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_write_text, load_checkpoint, output_lock
from brainit_pl.models.v2c import (
    COVARIANCE_TYPES,
    KINDS,
    ClusterMap,
    VoxelClusters,
    cluster_agreement,
    save_clusters,
)

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "encoder.voxel_embed.weight"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, type=Path, help="the prepared store (voxel geometry)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--embeddings",
        type=Path,
        help="encoder checkpoint (.ckpt) or embeddings (.npz/.npy); required for --kind functional",
    )
    parser.add_argument("--kind", choices=KINDS, default="functional", help="(default: %(default)s)")
    parser.add_argument("--clusters", type=int, default=128, help="K (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="k-means initialisation seed (default: 0)")
    parser.add_argument(
        "--covariance", choices=COVARIANCE_TYPES, default="full", help="GMM covariance (default: full)"
    )
    parser.add_argument("--max-iter", type=int, default=100, help="EM iterations at most (default: 100)")
    parser.add_argument(
        "--subjects",
        type=int,
        nargs="+",
        help="subjects (for .npy or coordinates; default: all in the store)",
    )
    parser.add_argument("--truth", type=Path, help="a simulated NSD root: write agreement.json (ARI)")
    parser.add_argument("--no-plots", action="store_true", help="skip the brain maps")
    parser.add_argument("--tensorboard", action="store_true", help="also log the maps under OUT/tb")


def load_embeddings(
    path: Path, store: Store, subjects: list[int] | None
) -> tuple[np.ndarray, dict[int, int]]:
    """Voxel embeddings (V, D) in global order and the subject → voxel count they cover."""
    require(path.is_file(), f"embeddings file {path} not found")
    if path.suffix == ".npy":
        emb = np.load(path, allow_pickle=False)
        n_voxels = {s: store.subject(s).n_voxels for s in (subjects or store.subjects)}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            missing = {"embeddings", "subjects", "n_voxels"} - set(f.files)
            require(not missing, f"{path} lacks the arrays {sorted(missing)}")
            emb, n_voxels = f["embeddings"], dict(zip(f["subjects"].tolist(), f["n_voxels"].tolist()))
    else:  # a Lightning checkpoint of the encoder module
        try:
            ckpt = load_checkpoint(path)
        except BrainITError:
            raise
        except Exception as err:  # torch raises many types for a foreign file
            raise BrainITError(f"{path} is not a readable checkpoint, .npz or .npy ({err})") from err
        state, hparams = ckpt.get("state_dict", {}), ckpt.get("hyper_parameters", {})
        require(
            CHECKPOINT_KEY in state and "n_voxels" in hparams,
            f"{path} holds no Universal Encoder voxel embeddings ({CHECKPOINT_KEY} and "
            "hyper_parameters['n_voxels'] expected)",
        )
        emb, n_voxels = state[CHECKPOINT_KEY].float().numpy(), hparams["n_voxels"]
    n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
    require(
        emb.ndim == 2 and len(emb) == sum(n_voxels.values()),
        f"{path}: embeddings of shape {emb.shape} do not match the voxel counts {n_voxels} "
        f"({sum(n_voxels.values())} rows expected)",
    )
    return emb, n_voxels


def _check_store(store: Store, n_voxels: dict[int, int]) -> None:
    for s, v in n_voxels.items():
        found = store.subject(s).n_voxels
        require(
            found == v, f"subject {s}: the embeddings cover {v} voxels but the store {store.root} has {found}"
        )


def _true_types(truth: Path, store: Store, subjects: list[int]) -> dict[int, np.ndarray]:
    """The simulator's voxel types of each subject, checked to be in the store's voxel order."""
    types = {}
    for s in subjects:
        path = truth / "simulation" / f"subj{s:02d}.npz"
        require(path.is_file(), f"{path} not found; --truth must be the root `brainit-pl simulate` wrote")
        with np.load(path, allow_pickle=False) as f:
            require(
                np.array_equal(f["ijk"], store.subject(s).ijk),
                f"{path}: its voxels (ijk) differ from subject {s} of the store {store.root}",
            )
            types[s] = f["type"].astype(np.int64)
    return types


def _agreement(
    clusters: ClusterMap, types: dict[int, np.ndarray], baseline: ClusterMap | None
) -> dict[str, object]:
    def scores(cm: ClusterMap) -> dict[str, object]:
        per = {str(s): cluster_agreement(cm.subject_labels(s), t) for s, t in types.items()}
        pooled = cluster_agreement(cm.cluster_of_voxel, np.concatenate(list(types.values())))
        return {"pooled": pooled, "per_subject": per}

    out: dict[str, object] = {
        "metric": "adjusted Rand index vs the simulator's true voxel types",
        "kind": clusters.kind,
        "n_clusters": clusters.n_clusters,
        "n_true_types": int(len(np.unique(np.concatenate(list(types.values()))))),
        "ari": scores(clusters),
    }
    if baseline is not None:
        out["anatomical_baseline_ari"] = scores(baseline)
    return out


def _sizes_csv(clusters: ClusterMap) -> str:
    subjects = list(clusters.n_voxels)
    per = {s: np.bincount(clusters.subject_labels(s), minlength=clusters.n_clusters) for s in subjects}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["cluster", "n_voxels", *(f"subj{s:02d}" for s in subjects)])
    total = np.bincount(clusters.cluster_of_voxel, minlength=clusters.n_clusters)
    for k in range(clusters.n_clusters):
        writer.writerow([k, int(total[k]), *(int(per[s][k]) for s in subjects)])
    shared = int((np.stack(list(per.values())) > 0).all(axis=0).sum())
    log.info(
        "cluster sizes: %d clusters, %d empty, min %d / median %d / max %d voxels; %d in every subject",
        clusters.n_clusters, int((total == 0).sum()), int(total.min()), int(np.median(total)),
        int(total.max()), shared,
    )  # fmt: skip
    return buf.getvalue()


def _plot_maps(out: Path, clusters: ClusterMap, store: Store, tensorboard: bool) -> list[Path]:
    """Draw each subject's clusters on its brain (volume or fsaverage surface): ``clusters_subjNN.png``
    (and TensorBoard images ``v2c/clusters_subjNN``)."""
    from brainit_pl.viz import log_png, plot_subject_map

    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    written = []
    for s in tqdm(clusters.n_voxels, desc="brain maps", unit="subject", disable=None):
        path = out / f"clusters_subj{s:02d}.png"
        title = f"subject {s}: {clusters.kind} clusters (K={clusters.n_clusters})"
        if not plot_subject_map(
            path, clusters.subject_labels(s), store.subject(s), title=title, categorical=True
        ):
            log.warning("subject %d: the store has no volume or surface geometry; no brain map", s)
            continue
        log_png(writer, f"v2c/clusters_subj{s:02d}", path)
        written.append(path)
    if writer is not None:
        writer.add_histogram(
            "v2c/cluster_sizes", np.bincount(clusters.cluster_of_voxel, minlength=clusters.n_clusters)
        )
        writer.close()
    return written


def _fit(features: np.ndarray, n_voxels: dict[int, int], args: argparse.Namespace, kind: str) -> ClusterMap:
    model = VoxelClusters(
        n_clusters=args.clusters,
        covariance_type=args.covariance,
        seed=args.seed,
        max_iter=args.max_iter,
        kind=kind,  # type: ignore[arg-type]
    ).fit(features)
    return ClusterMap(model.labels_, n_voxels, args.clusters, kind, args.seed)


def run(args: argparse.Namespace) -> int:
    with output_lock(args.out):
        store = Store(args.store)
        if args.kind == "functional":
            require(
                args.embeddings is not None, "--kind functional needs --embeddings (an encoder checkpoint)"
            )
        if args.embeddings is not None:
            embeddings, n_voxels = load_embeddings(args.embeddings, store, args.subjects)
        else:
            n_voxels = {s: store.subject(s).n_voxels for s in sorted(args.subjects or store.subjects)}
        _check_store(store, n_voxels)
        coords = np.concatenate([store.subject(s).xyz for s in n_voxels])  # (V, 3) mm, global order
        types = _true_types(args.truth, store, list(n_voxels)) if args.truth is not None else None

        clusters = _fit(embeddings if args.kind == "functional" else coords, n_voxels, args, args.kind)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "cluster_sizes.csv", _sizes_csv(clusters))
        if types is not None:
            baseline = _fit(coords, n_voxels, args, "anatomical") if args.kind == "functional" else None
            report = _agreement(clusters, types, baseline)
            atomic_write_text(args.out / "agreement.json", json.dumps(report, indent=2))
            log.info("ARI vs the true types: %s", json.dumps({k: v for k, v in report.items() if "ari" in k}))
        if not args.no_plots:
            _plot_maps(args.out, clusters, store, args.tensorboard)
        save_clusters(args.out / "clusters.npz", clusters)  # last: its presence means the job finished
        log.info("wrote %s", args.out / "clusters.npz")
        return 0
