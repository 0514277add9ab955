"""The torch side of the NSDDataModule: a batch plan (sampler) and a dataset whose items are whole batches.

Why whole batches: one store call per subject and batch, the averaging of repeats and the voxel draw
vectorised over the batch (a few large torch ops instead of B small numpy ones), and one message per
batch between a worker and the main process instead of B. The DataLoader runs with ``batch_size=None``;
:class:`BatchPlan` yields one :class:`BatchRequest` (sample indices + a random key) per batch and
:class:`BatchDataset` turns it into the batch dict inside the worker process.

Why the request carries its own random key: the voxel draw of a batch depends only on
``(seed, epoch, global batch number)``, never on which worker process fetched it, so the batches are the
same with 0 or 8 workers, with persistent workers, and differ across epochs and DDP ranks.

Why :class:`BatchPlan` subclasses :class:`~torch.utils.data.DistributedSampler`: it shards by rank itself
(bucketed batches cannot be sharded sample by sample), and Lightning leaves a ``DistributedSampler``
alone instead of wrapping it in another one under DDP; Lightning also calls its ``set_epoch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from brainit_pl.data.splits import SampleTable
from brainit_pl.data.store import Store
from brainit_pl.errors import require

if TYPE_CHECKING:
    from brainit_pl.features.cache import FeatureCache


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler sends to a worker: the samples of one batch and the key of its voxel draw.

    Attributes:
        indices: (B,) int64 sample indices into the split's :class:`SampleTable`.
        key: (seed, epoch, global batch number): seeds the batch's voxel draw.
    """

    indices: np.ndarray
    key: tuple[int, int, int]


class BatchPlan(DistributedSampler):
    """Yields the batches of one split for one rank, as :class:`BatchRequest` objects.

    Batches are either free mixes of samples (``bucket_by_subject=False``: a shuffled or ordered run of
    the sample list cut every ``batch_size``) or per-subject buckets (every batch holds one subject's
    samples; buckets are cut per subject, then the batch order is shuffled when ``shuffle``).

    Sharding: every rank builds the same global batch list (same seed and epoch) and takes batches
    ``rank, rank + world_size, ...``, so the shards are disjoint and together cover every sample once.
    DDP needs the same number of steps on every rank (a rank without a batch would hang the others at
    their next collective), so under DDP the largest batches are halved until the batch count is a
    multiple of ``world_size``. Only when that is impossible (every batch has one sample) do the shards
    differ by one batch — or, with ``even_shards`` (training), the < ``world_size`` extra batches are
    left out of that epoch.

    Args:
        subjects: (N,) the subject of each sample.
        batch_size: samples per batch (the last batch of a run or bucket may be smaller).
        shuffle: reshuffle samples and batch order every epoch (with ``seed`` and the epoch).
        bucket_by_subject: per-subject batches instead of mixed ones.
        seed: seed of the shuffles and of the voxel draws.
        rank, world_size: this process's place in distributed training.
        even_shards: drop the extra batches a degenerate split cannot balance (see above).
    """

    def __init__(
        self,
        subjects: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        bucket_by_subject: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = False,
    ) -> None:
        require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
        require(0 <= rank < world_size, f"rank {rank} is not in [0, world_size={world_size})")
        self.subjects = np.asarray(subjects, dtype=np.int64)
        # DistributedSampler's own fields (num_replicas, rank, shuffle, seed, epoch) are set here; its
        # per-sample index logic is not used (__iter__ and __len__ are overridden).
        super().__init__(
            range(len(self.subjects)), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        self.batch_size = batch_size
        self.bucket_by_subject = bucket_by_subject
        self.even_shards = even_shards

    def global_batches(self) -> list[np.ndarray]:
        """Every rank's batches of the current epoch, in order: a list of (B,) int64 sample indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.subjects)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.bucket_by_subject:
            return self._balance([order[i : i + self.batch_size] for i in range(0, n, self.batch_size)])
        batches = []
        for subject in np.unique(self.subjects):
            mine = order[self.subjects[order] == subject]  # keeps the (shuffled) order
            batches += [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return self._balance(batches)

    def _balance(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Halve the largest batch until the batch count is a multiple of the world size (if possible)."""
        while len(batches) % self.num_replicas:
            i = int(np.argmax([len(b) for b in batches]))
            if len(batches[i]) < 2:
                break
            half = (len(batches[i]) + 1) // 2
            batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
        return batches

    def _shard(self, n_batches: int) -> range:
        """Global batch numbers of this rank."""
        if self.even_shards:
            n_batches -= n_batches % self.num_replicas
        return range(self.rank, n_batches, self.num_replicas)

    def __iter__(self) -> Iterator[BatchRequest]:
        batches = self.global_batches()
        for b in self._shard(len(batches)):
            yield BatchRequest(indices=batches[b], key=(self.seed, self.epoch, b))

    def __len__(self) -> int:
        return len(self._shard(len(self.global_batches())))  # O(N) bookkeeping, no I/O


class BatchDataset(Dataset):
    """Reads whole batches from the store: ``dataset[BatchRequest]`` → the batch dict.

    The batch dict (B samples, k voxels each, or V_s = all voxels of the batch's one subject):

    * ``betas`` (B, k) float32: each sample's betas averaged over its trials, at the drawn voxels;
    * ``voxel_ids`` (B, k) int64: *global* voxel ids (``voxel_offsets[subject] + local index``);
    * ``subject``, ``nsd_id`` (0-based 73k id), ``n_repeats`` (trials averaged): (B,) int64;
    * ``image_<S>`` (B, 3, S, S) float32 in [0, 1] for each S in ``image_sizes``;
    * ``<name>_tokens`` (B, T, D) float32 for each feature cache in ``features`` (e.g. ``clip_tokens``).

    Args:
        store: the opened store (its HDF5 files are re-opened lazily in each worker process).
        samples: the split's samples.
        voxel_offsets: subject → first global voxel id.
        voxels_per_sample: k voxels drawn per sample, or ``None`` for all voxels (then every batch must
            hold a single subject: use a bucketed :class:`BatchPlan`).
        replacement: draw the k voxels with replacement (uniformly), or as k distinct voxels.
        image_sizes: image sizes to add to each batch (subset of the store's 224 and 112).
        features: name → feature cache whose tokens to add to each batch (read by row, like the images).
    """

    def __init__(
        self,
        store: Store,
        samples: SampleTable,
        voxel_offsets: dict[int, int],
        *,
        voxels_per_sample: int | None = None,
        replacement: bool = True,
        image_sizes: tuple[int, ...] = (),
        features: Mapping[str, FeatureCache] | None = None,
    ) -> None:
        self.store = store
        self.samples = samples
        self.voxel_offsets = dict(voxel_offsets)
        self.voxels_per_sample = voxels_per_sample
        self.replacement = replacement
        self.image_sizes = tuple(image_sizes)
        self.features = dict(features or {})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, request: BatchRequest) -> dict[str, torch.Tensor]:
        idx = np.asarray(request.indices, dtype=np.int64)
        subjects = self.samples.subject[idx]
        rng = np.random.default_rng(list(request.key))
        k = self.voxels_per_sample
        if k is None:
            require(len(np.unique(subjects)) == 1, "all-voxel batches must hold one subject (bucket them)")
        betas = torch.empty(len(idx), k or 0)
        voxel_ids = torch.empty(len(idx), k or 0, dtype=torch.int64)
        for subject in np.unique(subjects).tolist():
            pos = torch.from_numpy(np.flatnonzero(subjects == subject))
            means = self._mean_betas(subject, idx[pos.numpy()])  # (b, V)
            offset = self.voxel_offsets[subject]
            if k is None:  # one subject per batch: all its voxels
                betas = means
                voxel_ids = (offset + torch.arange(means.shape[1])).expand_as(means).contiguous()
                continue
            local = torch.from_numpy(self._draw_voxels(rng, len(pos), means.shape[1], k))  # (b, k)
            betas[pos] = torch.gather(means, 1, local)
            voxel_ids[pos] = local + offset
        batch = {
            "betas": betas,
            "voxel_ids": voxel_ids,
            "subject": torch.from_numpy(subjects),
            "nsd_id": torch.from_numpy(self.samples.nsd_id[idx]),
            "n_repeats": torch.from_numpy(self.samples.n_repeats[idx]),
        }
        for size in self.image_sizes:
            images = self.store.images.images(self.samples.nsd_id[idx], size=size)  # (B, 3, S, S) uint8
            batch[f"image_{size}"] = torch.from_numpy(images).float().div_(255.0)
        for name, cache in self.features.items():
            tokens = cache.tokens(self.samples.nsd_id[idx])  # (B, T, D) float16, one chunk read per image
            batch[f"{name}_tokens"] = torch.from_numpy(tokens).float()
        return batch

    def _mean_betas(self, subject: int, idx: np.ndarray) -> torch.Tensor:
        """Mean betas over the trials of samples ``idx`` (all of one subject) → (b, V) float32."""
        starts, ends = self.samples.row_ptr[idx], self.samples.row_ptr[idx + 1]
        counts = ends - starts
        rows = np.concatenate([self.samples.rows[s:e] for s, e in zip(starts, ends)])
        block = torch.from_numpy(
            self.store.subject(subject).betas(rows, dtype=None)
        ).float()  # (R, V), one store call
        # index_add_ sums each sample's rows in one vectorised pass (numpy's reduceat is ~50x slower here).
        owner = torch.from_numpy(np.repeat(np.arange(len(idx)), counts))  # (R,) sample of each row
        sums = torch.zeros(len(idx), block.shape[1]).index_add_(0, owner, block)
        return sums / torch.from_numpy(counts).unsqueeze(1)

    def _draw_voxels(self, rng: np.random.Generator, b: int, n_voxels: int, k: int) -> np.ndarray:
        """k local voxel indices per sample → (b, k) int64, uniform with or without replacement."""
        if self.replacement:
            return rng.integers(0, n_voxels, size=(b, k), dtype=np.int64)
        return np.stack([rng.choice(n_voxels, size=k, replace=False) for _ in range(b)]).astype(np.int64)
