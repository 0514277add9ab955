"""The torch side of the NSDDataModule: a batch plan (sampler) and a dataset whose items are whole batches.

Why whole batches: one store call per subject and batch, the averaging of repeats and the voxel draw
vectorised over the batch (a few large torch ops instead of B small numpy ones), and one message per
batch between a worker and the main process instead of B. The DataLoader runs with ``batch_size=None``;
:class:`BatchPlan` yields one :class:`BatchRequest` (sample indices + a random key) per batch and
:class:`BatchDataset` turns it into the batch dict inside the worker process.

Why the request carries its own random key: the voxel draw of a batch depends only on
``(seed, epoch, global batch number)``, never on which worker process fetched it, so the batches are the
same with 0 or 8 workers, with persistent workers, and differ across epochs and DDP ranks.

External samples (images with synthetic fMRI, :mod:`brainit_pl.data.external`): a training epoch has
``n_external`` extra *slots* after the real samples, shuffled together with them (so the real : synthetic
ratio holds per epoch and roughly per batch). What fills a slot (a subject, uniform, and its voxels; and,
unless ``external_rows="index"``, the image, uniform too) is drawn from the batch's key like the voxel draw,
so it is worker-independent too. With ``external_rows="index"`` slot N + i holds external image i: every
external image once per epoch (the authors' concatenated dataset).

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
    from brainit_pl.data.cache import FeatureCache
    from brainit_pl.data.external import ExternalData


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler sends to a worker: the samples of one batch and the key of its voxel draw.

    Attributes:
        indices: (B,) int64 sample indices into the split's :class:`SampleTable`; an index ``>= N`` (its
            length) is an external slot.
        key: (seed, epoch, global batch number): seeds the batch's voxel (and external) draws.
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
        n_external: external slots appended after the N samples (indices N .. N + n_external - 1) and
            shuffled with them; mixed batches only (not with ``bucket_by_subject``).
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
        n_external: int = 0,
    ) -> None:
        require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
        require(n_external >= 0, f"n_external must be >= 0, got {n_external}")
        require(not (bucket_by_subject and n_external), "external slots need mixed (not bucketed) batches")
        require(0 <= rank < world_size, f"rank {rank} is not in [0, world_size={world_size})")
        self.subjects = np.asarray(subjects, dtype=np.int64)
        # DistributedSampler's own fields (num_replicas, rank, shuffle, seed, epoch) are set here; its
        # per-sample index logic is not used (__iter__ and __len__ are overridden).
        self.n_slots = len(self.subjects) + n_external
        super().__init__(range(self.n_slots), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.bucket_by_subject = bucket_by_subject
        self.even_shards = even_shards

    def global_batches(self) -> list[np.ndarray]:
        """Every rank's batches of the current epoch, in order: a list of (B,) int64 sample indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.n_slots
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

    * ``betas`` (B, k) float32: each sample's betas averaged over its trials (an external sample: its
      subject's synthetic betas), at the drawn voxels;
    * ``voxel_ids`` (B, k) int64: *global* voxel ids (``voxel_offsets[subject] + local index``);
    * ``subject``, ``nsd_id``, ``n_repeats`` (B,) int64: the subject (drawn, for an external sample), the
      0-based 73k image id (``-1 - row`` for external image ``row``: negative, never a 73k id) and the
      trials averaged (1 for an external sample);
    * ``external`` (B,) bool: which samples are external images with synthetic fMRI (all false without
      ``external``, and so in val/test);
    * ``image_<S>`` (B, 3, S, S) float32 in [0, 1] for each S in ``image_sizes`` (external samples: from
      the external image store);
    * ``<name>_tokens`` (B, T, D) float32 for each feature cache in ``features`` (e.g. ``clip_tokens``;
      external samples: from the external folder's cache of the same name).

    Args:
        store: the opened store (its HDF5 files are re-opened lazily in each worker process).
        samples: the split's samples.
        voxel_offsets: subject → first global voxel id.
        voxels_per_sample: k voxels drawn per sample, or ``None`` for all voxels (then every batch must
            hold a single subject: use a bucketed :class:`BatchPlan`).
        replacement: draw the k voxels with replacement (uniformly), or as k distinct voxels.
        image_sizes: image sizes to add to each batch (subset of the store's 224 and 112).
        features: name → feature cache whose tokens to add to each batch (read by row, like the images).
        external: external images with synthetic fMRI, which fill a request's slots ``>= len(samples)``
            (needs ``voxels_per_sample``, and an external cache for every name in ``features``).
        external_rows: ``"draw"`` (each slot draws its image) or ``"index"`` (slot ``len(samples) + i`` is
            external image i).
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
        external: ExternalData | None = None,
        external_rows: str = "draw",
    ) -> None:
        require(
            external_rows in ("draw", "index"), f"external_rows must be draw or index, got {external_rows!r}"
        )
        self.external_rows = external_rows
        self.store = store
        self.samples = samples
        self.voxel_offsets = dict(voxel_offsets)
        self.voxels_per_sample = voxels_per_sample
        self.replacement = replacement
        self.image_sizes = tuple(image_sizes)
        self.features = dict(features or {})
        self.external = external
        if external is not None:
            require(voxels_per_sample is not None, "external samples need voxels_per_sample (k voxels each)")
            missing = [name for name in self.features if name not in external.features]
            require(not missing, f"the external data {external.root} has no feature cache for {missing}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, request: BatchRequest) -> dict[str, torch.Tensor]:
        idx = np.asarray(request.indices, dtype=np.int64)
        is_external = idx >= len(self.samples)
        batch = self._real(idx[~is_external], np.random.default_rng(list(request.key)))
        if is_external.any():
            require(
                self.external is not None,
                f"sample index {idx.max()} >= {len(self.samples)}: no external data",
            )
            # A child stream of the same key: the real samples' voxel draws stay what they are without
            # external data, and the external draws depend only on the key (not on the worker).
            rng = np.random.default_rng(np.random.SeedSequence(list(request.key)).spawn(1)[0])
            mask = torch.from_numpy(is_external)
            rows = idx[is_external] - len(self.samples) if self.external_rows == "index" else None
            batch = _interleave(batch, self._external(int(is_external.sum()), rng, rows), mask)
        batch["external"] = torch.from_numpy(is_external)
        return batch

    def _real(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The batch dict (without ``external``) of the split's samples ``idx``."""
        subjects = self.samples.subject[idx]
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
            betas[pos], voxel_ids[pos] = self._at_drawn_voxels(rng, means, offset)
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

    def _external(
        self, n: int, rng: np.random.Generator, rows: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch dict (without ``external``) of ``n`` external slots (of image ``rows``, else drawn)."""
        rows, subjects = self.external.draw(rng, n, rows)  # (n,), (n,)
        betas = torch.empty(n, self.voxels_per_sample)
        voxel_ids = torch.empty(n, self.voxels_per_sample, dtype=torch.int64)
        for subject in np.unique(subjects).tolist():
            pos = torch.from_numpy(np.flatnonzero(subjects == subject))
            full = torch.from_numpy(self.external.betas(subject, rows[pos.numpy()]))  # (b, V_s)
            betas[pos], voxel_ids[pos] = self._at_drawn_voxels(rng, full, self.voxel_offsets[subject])
        batch = {
            "betas": betas,
            "voxel_ids": voxel_ids,
            "subject": torch.from_numpy(subjects),
            "nsd_id": torch.from_numpy(-1 - rows),
            "n_repeats": torch.ones(n, dtype=torch.int64),
        }
        for size in self.image_sizes:
            batch[f"image_{size}"] = torch.from_numpy(self.external.images(rows, size)).float().div_(255.0)
        for name in self.features:
            batch[f"{name}_tokens"] = torch.from_numpy(self.external.tokens(name, rows)).float()
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

    def _at_drawn_voxels(
        self, rng: np.random.Generator, betas: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, V) betas of one subject → their (b, k) values at k drawn voxels and the (b, k) global ids."""
        local = torch.from_numpy(
            self._draw_voxels(rng, betas.shape[0], betas.shape[1], self.voxels_per_sample)
        )
        return torch.gather(betas, 1, local), local + offset

    def _draw_voxels(self, rng: np.random.Generator, b: int, n_voxels: int, k: int) -> np.ndarray:
        """k local voxel indices per sample → (b, k) int64, uniform with or without replacement."""
        if self.replacement:
            return rng.integers(0, n_voxels, size=(b, k), dtype=np.int64)
        return np.stack([rng.choice(n_voxels, size=k, replace=False) for _ in range(b)]).astype(np.int64)


def _interleave(
    real: dict[str, torch.Tensor], external: dict[str, torch.Tensor], is_external: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Merge the real and the external samples' dicts in batch order (``is_external``: (B,) bool)."""
    out = {}
    for key, r in real.items():
        x = torch.empty((len(is_external), *r.shape[1:]), dtype=r.dtype)  # (B, ...)
        x[~is_external], x[is_external] = r, external[key]
        out[key] = x
    return out
