"""Per-image test scores of the feature models: one mixin for the BIT, MindEye2-style and ridge modules.

At test time the module records each test sample's (subject, nsd_id) beside its
:func:`~brainit_pl.metrics.features.feature_quality` update; at ``on_test_epoch_end`` (before the collection
is reset) :meth:`TestScoresMixin.write_test_scores` gathers the per-image values from every rank (a
collective call: every rank makes it) and global rank 0 writes ``test_scores.csv``
(:func:`~brainit_pl.metrics.compare.write_test_scores`) in ``trainer.log_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor
from torchmetrics import MetricCollection

from brainit_pl.metrics.compare import SCORES_FILE, write_test_scores
from brainit_pl.metrics.features import SampleKeys, per_image_quality

log = logging.getLogger(__name__)


class TestScoresMixin:
    """Adds ``test_scores.csv`` to a LightningModule whose test quality is a ``feature_quality`` collection.

    The module calls :meth:`init_test_scores` in ``__init__``, :meth:`record_test_keys` with each test batch
    whose predictions it adds to the collection, and :meth:`write_test_scores` at ``on_test_epoch_end``.
    """

    __test__ = False  # not a pytest test class, despite the name

    def init_test_scores(self) -> None:
        """Create the (non-persistent) state that collects the test samples' keys."""
        self.test_keys = SampleKeys()

    def record_test_keys(self, batch: dict[str, Tensor]) -> None:
        """Note the (subject, nsd_id) of a test batch, in the order of the quality updates."""
        self.test_keys.update(batch["subject"], batch["nsd_id"])

    def write_test_scores(self, quality: MetricCollection) -> Path | None:
        """Gather the per-image test scores and write them on global rank 0; the written path, else ``None``.

        Call it before ``quality`` is reset; it resets only the keys.
        """
        if not self.test_keys.update_called:
            return None
        keys, values = per_image_quality(quality, self.test_keys)
        self.test_keys.reset()
        log_dir = self.trainer.log_dir  # collective under DDP (a broadcast from rank 0): every rank asks
        if not self.trainer.is_global_zero or log_dir is None:
            return None
        path = Path(log_dir) / SCORES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_test_scores(path, keys, values)
        log.info("per-image test scores of %d samples: %s", len(keys), path)
        return path
