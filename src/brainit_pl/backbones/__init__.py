"""Factories for the frozen pretrained networks (and their tiny twins) that brainit-pl uses but never trains.

Each ``build_<thing>`` returns a frozen, eval-mode module whose weights come from local files only; every
network has a tiny twin (random, seeded, instant on CPU) built by the same factory and loaded through the
same code. None of them ever lands in a checkpoint.

* :func:`build_metric_net`: the feature networks of the image metrics (AlexNet, Inception v3, CLIP
  ViT-L/14, EfficientNet-B1, SwAV ResNet-50), with the evaluation protocol's resize and normalisation.
"""

from brainit_pl.backbones.metric_nets import (
    METRIC_NETS,
    WEIGHTS_ENV,
    MetricNet,
    MetricNetSpec,
    build_bare_metric_net,
    build_metric_net,
    resolve_weights,
    weights_folder,
)

__all__ = [
    "METRIC_NETS",
    "WEIGHTS_ENV",
    "MetricNet",
    "MetricNetSpec",
    "build_bare_metric_net",
    "build_metric_net",
    "resolve_weights",
    "weights_folder",
]
