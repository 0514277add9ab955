"""External training samples: images with synthetic fMRI (``brainit-pl synthesize-fmri``) for the NSDDataModule.

Brain-IT trains its BITs on the NSD training images plus unlabeled external images, each paired, at every
draw, with the Universal Encoder's predicted fMRI of a randomly chosen subject (docs/method.md §1, §7).
:class:`ExternalData` opens such a folder for the DataModule's subjects, checks that it fits the store, draws
the (image, subject) pair of each external slot and reads its rows;
:class:`~brainit_pl.data.datasets.BatchDataset` mixes them into the training batches.

The external images never hold a shared (test) image: ``synthesize-fmri`` refuses such sets when it writes the
folder (by declared NSD id and by pixels), so nothing here has to repeat that check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from brainit_pl.data.cache import FeatureCache, cache_path
from brainit_pl.data.synthetic_store import SyntheticFMRI, fmri_path
from brainit_pl.errors import BrainITError, require


class ExternalData:
    """A synthetic-fMRI folder opened for some subjects of a store: the external slots of a training batch.

    Args:
        folder: the folder ``synthesize-fmri`` wrote (``images.h5`` + ``fmri_subjNN.h5``).
        n_voxels: subject → V_s in the store, for every subject an external slot may draw.
        features: feature names whose caches (``folder/features_<name>.h5``) to open, as the store's.
        store: the store folder (only named in the error messages' fix commands).

    Attributes:
        subjects: (S,) int64 the subjects a slot draws from, sorted.
        n_images: N external images.
        features: name → the external images' feature cache.

    Raises:
        BrainITError: no finished synthetic fMRI in ``folder``, a subject without synthetic fMRI or with
            another voxel count than the store's, or a missing or stale feature cache; each naming the
            command that fixes it.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        n_voxels: Mapping[int, int],
        features: Sequence[str] = (),
        store: str | os.PathLike = "STORE",
    ) -> None:
        self.synthetic = SyntheticFMRI(folder)
        root = self.synthetic.root
        synthesize = f"brainit-pl synthesize-fmri --checkpoint ENCODER.ckpt --store {store} --out {root}"
        for subject, v in sorted(n_voxels.items()):
            require(
                subject in self.synthetic.n_voxels,
                f"external: subject {subject} has no synthetic fMRI in {root} (it has subjects "
                f"{self.synthetic.subjects}); run `{synthesize}` with an encoder trained on subject {subject} "
                "(add --overwrite if another checkpoint wrote that folder), or choose other subjects",
            )
            found = self.synthetic.n_voxels[subject]
            require(
                found == v,
                f"external: subject {subject} has {v} voxels in the store {store} but {found} in "
                f"{fmri_path(root, subject)}; re-run `{synthesize} --overwrite` with an encoder trained on "
                "this store",
            )
        self.subjects = np.array(sorted(n_voxels), dtype=np.int64)
        self.n_images = self.synthetic.n_images
        self.features: dict[str, FeatureCache] = {}
        for name in dict.fromkeys(features):
            try:
                self.features[name] = FeatureCache(cache_path(root, name), self.synthetic.image_store)
            except BrainITError as err:  # its message names the extract-features command for this folder
                raise BrainITError(f"external: {err}") from err

    @property
    def root(self) -> Path:
        return self.synthetic.root

    def draw(
        self, rng: np.random.Generator, n: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pairs of ``n`` external slots: (image rows (n,), subjects (n,)) int64.

        Args:
            rng: the slots' random stream.
            n: number of slots.
            rows: the slots' image rows when the epoch fixes them (``external_mode: concat``, every image
                once); ``None``: each row uniform and independent (``ratio``: with replacement, an image may
                come back in the same epoch, with another subject).

        The subject of every slot is uniform and independent, at every draw.
        """
        if rows is None:
            rows = rng.integers(0, self.n_images, size=n, dtype=np.int64)
        require(len(rows) == n, f"external: {len(rows)} rows for {n} slots")
        subjects = self.subjects[rng.integers(0, len(self.subjects), size=n)]
        return np.asarray(rows, dtype=np.int64), subjects

    def betas(self, subject: int, rows: np.ndarray) -> np.ndarray:
        """Synthetic betas of image ``rows`` for ``subject`` → (n, V_s) float32, in the order given."""
        return self.synthetic.betas(subject, rows)

    def images(self, rows: np.ndarray, size: int) -> np.ndarray:
        """External images of ``rows`` → (n, 3, size, size) uint8."""
        return self.synthetic.images(rows, size=size)

    def tokens(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Feature tokens of image ``rows`` from the external cache ``name`` → (n, T, D) float16."""
        return self.features[name].tokens(self.synthetic.image_store.nsd_ids[rows])
