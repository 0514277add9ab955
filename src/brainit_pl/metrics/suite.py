"""The standard NSD evaluation suite as one :class:`~torchmetrics.MetricCollection`.

Update it with keyword arguments only; the collection hands each metric the keywords its ``update``
declares (torchmetrics' ``_filter_kwargs``), and every ``update`` here accepts being called with none::

    suite = build_eval_suite("mindeye2", nets="tiny")
    suite.update(recons=recons, gt=gt)                           # image metrics
    suite.update(brain_embeds=brain, image_embeds=image)         # retrieval (optional)
    values = summarize(suite.compute())                          # {"pixcorr": 0.31, ..., "retrieval_brain": None}

Positional arguments would reach every metric, retrieval included, so do not use them. ``forward`` (calling
the suite) would compute on each batch alone; use ``update`` and ``compute``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from brainit_pl.errors import BrainITError
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL, RETRIEVAL_SEED, Protocol, get_protocol

if TYPE_CHECKING:  # the metrics are imported where they are built: the names below need no torch
    from torch import Tensor, nn
    from torchmetrics import Metric, MetricCollection

TWO_WAY_NETS: tuple[str, ...] = ("alexnet2", "alexnet5", "inception", "clip")
DISTANCE_NETS: tuple[str, ...] = ("effnet", "swav")
METRIC_NAMES: tuple[str, ...] = (
    "pixcorr", "ssim", *TWO_WAY_NETS, *DISTANCE_NETS, "retrieval_image", "retrieval_brain",
)  # fmt: skip
HIGHER_IS_BETTER: dict[str, bool] = {name: name not in DISTANCE_NETS for name in METRIC_NAMES}
# Metrics that are a mean over images, hence have a per-image value to bootstrap (retrieval is not).
PER_IMAGE_METRICS: tuple[str, ...] = ("pixcorr", "ssim", *TWO_WAY_NETS, *DISTANCE_NETS)
NET_KINDS: tuple[str, ...] = ("real", "tiny", "random")


def build_feature_nets(
    protocol: str | Protocol = DEFAULT_PROTOCOL,
    nets: str = "real",
    weights_dir: str | os.PathLike | None = None,
) -> dict[str, nn.Module]:
    """Build the six metric networks of one protocol.

    Args:
        protocol: ``"mindeye2"`` or ``"braindiffuser"``, or a :class:`Protocol` (e.g. with options).
        nets: ``"real"`` (weight files from the weights folder), ``"tiny"`` (random tiny twins) or
            ``"random"`` (real architectures, random weights; for benchmarks).
        weights_dir: the weights folder for ``"real"``.

    Returns:
        name → :class:`~brainit_pl.metrics.nets.MetricNet`.
    """
    from brainit_pl.backbones.weights import resolve_weights
    from brainit_pl.metrics.nets import METRIC_NETS, build_metric_net

    if nets not in NET_KINDS:
        raise BrainITError(f"unknown network kind {nets!r}; expected one of {', '.join(NET_KINDS)}")
    proto = get_protocol(protocol)
    names = (*TWO_WAY_NETS, *DISTANCE_NETS)
    if nets == "real":
        for name in names:  # report a missing file before spending time building the others
            resolve_weights(proto.weights_key(name, METRIC_NETS[name].weights_key), weights_dir=weights_dir)
    return {
        name: build_metric_net(
            name,
            protocol=proto,
            tiny=nets == "tiny",
            random_init=nets == "random",
            weights_dir=weights_dir,
        )
        for name in names
    }


def build_eval_suite(
    protocol: str | Protocol = DEFAULT_PROTOCOL,
    *,
    nets: str = "real",
    weights_dir: str | os.PathLike | None = None,
    feature_nets: Mapping[str, nn.Module] | None = None,
    retrieval: bool = True,
    retrieval_seed: int = RETRIEVAL_SEED,
    **metric_kwargs,
) -> MetricCollection:
    """The full metric suite of one protocol.

    Args:
        protocol: ``"mindeye2"`` (default) or ``"braindiffuser"``, or a :class:`Protocol` (e.g.
            ``MindEye2Protocol(antialias=True)``); one suite never mixes protocols.
        nets: ``"real"``, ``"tiny"`` or ``"random"`` (see :func:`build_feature_nets`); ignored for the
            networks given in ``feature_nets``.
        weights_dir: the weights folder for real networks.
        feature_nets: prebuilt networks by name (``alexnet2`` ... ``swav``), e.g. to share them between suites.
        retrieval: include :class:`Retrieval` (it needs ≥ 300 items once embeddings are given).
        retrieval_seed: seed of the retrieval subsets (42, MindEye2's).
        **metric_kwargs: :class:`~torchmetrics.Metric` options for every metric (``compute_on_cpu``, ...).

    Returns:
        A MetricCollection with keys ``pixcorr``, ``ssim``, ``alexnet2``, ``alexnet5``, ``inception``,
        ``clip``, ``effnet``, ``swav`` (and ``retrieval``, whose result is flattened into
        ``retrieval_image`` and ``retrieval_brain``).
    """
    proto = get_protocol(protocol)
    given = dict(feature_nets or {})
    for name, net in given.items():
        net_protocol = getattr(net, "protocol", proto)
        if net_protocol != proto:
            raise BrainITError(
                f"feature network {name!r} preprocesses for {net_protocol!r}, but the suite is "
                f"{proto!r}; protocols are never mixed in one table"
            )
    missing = [name for name in (*TWO_WAY_NETS, *DISTANCE_NETS) if name not in given]
    if missing:
        built = build_feature_nets(proto, nets, weights_dir)
        given.update({name: built[name] for name in missing})
    from torchmetrics import MetricCollection

    from brainit_pl.metrics.identification import CorrelationDistance, TwoWayIdentification
    from brainit_pl.metrics.image import SSIM, PixCorr
    from brainit_pl.metrics.retrieval import Retrieval

    metrics: dict[str, Metric] = {
        "pixcorr": PixCorr(proto, **metric_kwargs),
        "ssim": SSIM(proto, **metric_kwargs),
    }
    metrics.update({name: TwoWayIdentification(given[name], **metric_kwargs) for name in TWO_WAY_NETS})
    metrics.update({name: CorrelationDistance(given[name], **metric_kwargs) for name in DISTANCE_NETS})
    if retrieval:
        metrics["retrieval"] = Retrieval(seed=retrieval_seed, **metric_kwargs)
    # compute_groups=False: the metrics never share states, and group detection would compare features.
    return MetricCollection(metrics, compute_groups=False)


def summarize(computed: Mapping[str, Tensor | float | None]) -> dict[str, float | None]:
    """Turn a suite's ``compute()`` into plain floats, in :data:`METRIC_NAMES` order; absent or NaN → ``None``."""
    out: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        value = computed.get(name)
        value = None if value is None else float(value)
        out[name] = None if value is None or math.isnan(value) else value
    return out


def per_image_values(suite: MetricCollection) -> dict[str, Tensor]:
    """The per-image values of a suite's image metrics (:data:`PER_IMAGE_METRICS`), each (N,) float64.

    Their means are the metrics; two-way identification gives, per reconstruction, the fraction of the
    N − 1 comparisons it wins. Metrics absent from the suite, or without images, are left out.
    """
    out: dict[str, Tensor] = {}
    for name in PER_IMAGE_METRICS:
        if name in suite:
            try:
                out[name] = suite[name].per_image()
            except BrainITError:  # no images were given
                continue
    return out
