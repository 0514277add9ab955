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

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it. Imported on first use (PEP 562), so that reading a constant of
# one submodule (``brainit-pl evaluate --help``) does not import torchmetrics and the feature networks.
_EXPORTS = {
    "bootstrap_ci": "bootstrap",
    "paired_bootstrap": "bootstrap",
    "CorrelationDistance": "identification",
    "TwoWayIdentification": "identification",
    "two_way_identification": "identification",
    "SSIM": "image",
    "InvalidInputError": "image",
    "PixCorr": "image",
    "check_images": "image",
    "DEFAULT_PROTOCOL": "protocols",
    "PROTOCOL_VERSIONS": "protocols",
    "PROTOCOLS": "protocols",
    "get_protocol": "protocols",
    "comparability": "report",
    "log_to_tensorboard": "report",
    "make_results": "report",
    "read_results": "report",
    "write_reports": "report",
    "Retrieval": "retrieval",
    "METRIC_NAMES": "suite",
    "build_eval_suite": "suite",
    "build_feature_nets": "suite",
    "per_image_values": "suite",
    "summarize": "suite",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = [  # noqa: F822 (defined through __getattr__)
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
