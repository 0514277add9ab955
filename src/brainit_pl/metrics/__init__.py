"""The standard NSD image metrics (MindEye2's evaluator, and Brain-Diffuser's as a second protocol).

Every metric is a :class:`torchmetrics.Metric` whose states sync across devices; :func:`build_eval_suite`
puts them in one :class:`~torchmetrics.MetricCollection`. Definitions: docs/metrics.md.

* :class:`PixCorr`, :class:`SSIM`: pixel metrics at 425².
* :class:`TwoWayIdentification`: AlexNet(2), AlexNet(5), Inception v3, CLIP ViT-L/14.
* :class:`CorrelationDistance`: EfficientNet-B1, SwAV.
* :class:`Retrieval`: 300-way top-1 between brain and image embeddings.
* :mod:`~brainit_pl.metrics.bootstrap`: bootstrap intervals over images and paired comparisons.
* :mod:`~brainit_pl.metrics.report`: metrics.md / .csv / .json and TensorBoard logging.
* :mod:`~brainit_pl.metrics.evaluate`: the ``brainit-pl evaluate`` job.
* :mod:`~brainit_pl.metrics.nets` (tiny twins in :mod:`~brainit_pl.metrics.nets_tiny`): the metrics'
  feature networks with each protocol's resize and normalisation.
* :mod:`~brainit_pl.metrics.features`: feature-prediction quality (token cosine, two-way) of the decoders.

Layer (:mod:`brainit_pl.layers`): may import ``backbones`` (weights, the frozen wrapper) and ``viz``; never
data, models or Lightning modules.
"""

from brainit_pl.metrics.bootstrap import bootstrap_ci, paired_bootstrap
from brainit_pl.metrics.identification import (
    CorrelationDistance,
    TwoWayIdentification,
    two_way_identification,
)
from brainit_pl.metrics.image import SSIM, InvalidInputError, PixCorr, check_images
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, PROTOCOL_VERSIONS, PROTOCOLS, get_protocol
from brainit_pl.metrics.report import (
    comparability,
    log_to_tensorboard,
    make_results,
    read_results,
    write_reports,
)
from brainit_pl.metrics.retrieval import Retrieval
from brainit_pl.metrics.suite import (
    METRIC_NAMES,
    build_eval_suite,
    build_feature_nets,
    per_image_values,
    summarize,
)

__all__ = [
    "DEFAULT_PROTOCOL",
    "METRIC_NAMES",
    "PROTOCOLS",
    "PROTOCOL_VERSIONS",
    "SSIM",
    "CorrelationDistance",
    "InvalidInputError",
    "PixCorr",
    "Retrieval",
    "TwoWayIdentification",
    "bootstrap_ci",
    "build_eval_suite",
    "build_feature_nets",
    "check_images",
    "comparability",
    "get_protocol",
    "log_to_tensorboard",
    "make_results",
    "paired_bootstrap",
    "per_image_values",
    "read_results",
    "summarize",
    "two_way_identification",
    "write_reports",
]
