"""Feature-network metrics: two-way identification (AlexNet, Inception, CLIP) and correlation distance
(EfficientNet-B1, SwAV).

Two-way identification needs every pair at once (each reconstruction is compared with every other ground
truth), so it keeps the features as ``cat`` states — they gather across devices — and scores at
``compute``. The correlation distance only needs matching pairs, so it keeps one distance per pair. Both
give a per-image value (:meth:`per_image`) whose mean is the metric, for bootstrap intervals over images:
for two-way identification, the fraction of the N − 1 comparisons that reconstruction j wins.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from brainit_pl.metrics.image import InvalidInputError, check_images, is_empty, pearson_rows
from brainit_pl.metrics.protocols import DEFAULT_PROTOCOL


def resolve_feature_extractor(
    feature_extractor: nn.Module | str, protocol: str = DEFAULT_PROTOCOL
) -> nn.Module:
    """A module as is, or a metric network name built with real weights from the weights folder."""
    if isinstance(feature_extractor, str):
        from brainit_pl.metrics.nets import build_metric_net  # lazy: it imports metrics

        return build_metric_net(feature_extractor, protocol=protocol)
    if not callable(feature_extractor):
        raise TypeError(
            f"feature_extractor must be an nn.Module or a metric network name, got {feature_extractor!r}"
        )
    return feature_extractor


def correlation_matrix(gt_features: Tensor, recon_features: Tensor) -> Tensor:
    """C[i, j] = Pearson r(gt_features[i], recon_features[j]), in float64.

    Args:
        gt_features: (N, D).
        recon_features: (N, D).

    Returns:
        (N, N) float64.
    """

    def standardise(f: Tensor) -> Tensor:  # rows with zero mean and unit norm
        f = f.double()
        f = f - f.mean(dim=1, keepdim=True)
        return f / f.norm(dim=1, keepdim=True)

    return standardise(gt_features) @ standardise(recon_features).T


def two_way_identification(gt_features: Tensor, recon_features: Tensor) -> Tensor:
    """Fraction of comparisons in which a reconstruction is closer to its own ground truth.

    For each reconstruction j, count the ground truths i ≠ j with C[i, j] < C[j, j]; the score is the
    mean over j of count / (N − 1) (MindEye2's and Brain-Diffuser's ``two_way_identification``). 0.5 is chance.

    Args:
        gt_features: (N, D), N ≥ 2.
        recon_features: (N, D).

    Returns:
        float64 scalar in [0, 1].
    """
    n = gt_features.shape[0]
    if n < 2:
        raise InvalidInputError(f"two-way identification needs at least 2 images, got {n}")
    return two_way_from_scores(correlation_matrix(gt_features, recon_features))


def two_way_from_scores(scores: Tensor) -> Tensor:
    """Two-way identification from any (N gt, N recon) similarity matrix (higher = more alike).

    For each reconstruction j, the fraction of ground truths i ≠ j with S[i, j] < S[j, j], averaged over j.
    """
    n = scores.shape[0]
    return two_way_wins(scores).double().mean() / (n - 1)


def two_way_wins(scores: Tensor) -> Tensor:
    """(N,) long: for each reconstruction j, the number of ground truths i ≠ j with S[i, j] < S[j, j]."""
    congruent = scores.diagonal()  # (N,), S[j, j]
    return (scores < congruent.unsqueeze(0)).sum(dim=0)  # per reconstruction j; the diagonal never wins


def two_way_per_image(gt_features: Tensor, recon_features: Tensor) -> Tensor:
    """(N,) float64: per reconstruction j, the fraction of the N − 1 comparisons it wins; the mean is
    :func:`two_way_identification`. Resampling these values is how images are bootstrapped (the matrix
    itself is not recomputed)."""
    n = gt_features.shape[0]
    if n < 2:
        raise InvalidInputError(f"two-way identification needs at least 2 images, got {n}")
    return two_way_wins(correlation_matrix(gt_features, recon_features)).double() / (n - 1)


class _FeatureMetric(Metric):
    """Shared plumbing: a frozen feature network that is *not* a submodule (never checkpointed)."""

    full_state_update = False
    is_differentiable = False

    def __init__(
        self, feature_extractor: nn.Module | str, protocol: str = DEFAULT_PROTOCOL, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        # object.__setattr__ keeps the network out of the module tree, hence out of state_dict and DDP;
        # a MetricNet moves itself to the images' device.
        object.__setattr__(self, "feature_extractor", resolve_feature_extractor(feature_extractor, protocol))

    def _features(self, recons: Tensor | None, gt: Tensor | None) -> tuple[Tensor, Tensor] | None:
        if recons is None and gt is None:
            return None
        if recons is None or gt is None:
            raise InvalidInputError("give both recons and gt (or neither)")
        recons, gt = check_images(recons, gt)
        with torch.no_grad():
            f_rec = self.feature_extractor(recons).flatten(1)  # (B, D)
            f_gt = self.feature_extractor(gt).flatten(1)  # (B, D)
        return f_rec.to(self.device), f_gt.to(self.device)


class TwoWayIdentification(_FeatureMetric):
    """Two-way identification ↑ in the feature space of ``feature_extractor``.

    Args:
        feature_extractor: a module mapping (B, 3, H, W) images in [0, 1] to (B, D) or (B, ...) features
            (e.g. ``build_metric_net("alexnet2")``, which includes the protocol's resize and normalisation),
            or the name of a metric network, built with real weights.
        protocol: used only when ``feature_extractor`` is a name.
        **kwargs: :class:`~torchmetrics.Metric` options (``compute_on_cpu=True`` keeps features in RAM).

    Example:
        >>> metric = TwoWayIdentification(build_metric_net("clip", tiny=True))  # doctest: +SKIP
        >>> metric.update(recons=recons, gt=gt)  # doctest: +SKIP
        >>> metric.compute()  # fraction in [0, 1]  # doctest: +SKIP
    """

    higher_is_better = True

    def __init__(
        self, feature_extractor: nn.Module | str, protocol: str = DEFAULT_PROTOCOL, **kwargs
    ) -> None:
        super().__init__(feature_extractor, protocol, **kwargs)
        self.add_state("gt_features", default=[], dist_reduce_fx="cat")
        self.add_state("recon_features", default=[], dist_reduce_fx="cat")

    def update(self, recons: Tensor | None = None, gt: Tensor | None = None) -> None:
        """Extract and keep the features of a batch of pairs.

        Args:
            recons: (B, 3, H, W) uint8 or float in [0, 1]; ``None`` with ``gt`` ``None`` is a no-op.
            gt: (B, 3, H', W') ground truths of the same kind.
        """
        features = self._features(recons, gt)
        if features is not None:
            self.recon_features.append(features[0])
            self.gt_features.append(features[1])

    def per_image(self) -> Tensor:
        """(N,) float64: per reconstruction, the fraction of the other N − 1 ground truths it beats."""
        if is_empty(self.gt_features):
            raise InvalidInputError("TwoWayIdentification: no images were given")
        return two_way_per_image(dim_zero_cat(self.gt_features), dim_zero_cat(self.recon_features))

    def compute(self) -> Tensor:
        """Two-way identification over all pairs seen (float64 scalar in [0, 1])."""
        if is_empty(self.gt_features):
            raise InvalidInputError("TwoWayIdentification: no images were given")
        return two_way_identification(dim_zero_cat(self.gt_features), dim_zero_cat(self.recon_features))


class CorrelationDistance(_FeatureMetric):
    """Correlation distance ↓: mean over pairs of 1 − r(F_gt[i], F_rec[i]) (``scipy.spatial.distance.correlation``).

    Args:
        feature_extractor: as for :class:`TwoWayIdentification` (EfficientNet-B1 or SwAV in the suite).
        protocol: used only when ``feature_extractor`` is a name.
        **kwargs: :class:`~torchmetrics.Metric` options.
    """

    higher_is_better = False

    def __init__(
        self, feature_extractor: nn.Module | str, protocol: str = DEFAULT_PROTOCOL, **kwargs
    ) -> None:
        super().__init__(feature_extractor, protocol, **kwargs)
        self.add_state("distances", default=[], dist_reduce_fx="cat")

    def update(self, recons: Tensor | None = None, gt: Tensor | None = None) -> None:
        """Add a batch of pairs (same arguments as :meth:`TwoWayIdentification.update`)."""
        features = self._features(recons, gt)
        if features is not None:
            self.distances.append(1.0 - pearson_rows(features[1], features[0]))  # (B,) float64

    def per_image(self) -> Tensor:
        """(N,) float64: the correlation distance of every pair seen."""
        if is_empty(self.distances):
            raise InvalidInputError("CorrelationDistance: no images were given")
        return dim_zero_cat(self.distances)

    def compute(self) -> Tensor:
        """Mean correlation distance over all pairs seen (float64 scalar in [0, 2])."""
        return self.per_image().mean()
