"""Multi-device behaviour: two "ranks" merged (or synced through torchmetrics' own sync path) equal one process."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from brainit_pl.metrics import SSIM, CorrelationDistance, PixCorr, Retrieval, TwoWayIdentification
from brainit_pl.metrics.nets import build_metric_net


def _gathered_leaves(metric: Metric) -> list[torch.Tensor]:
    """The tensors torchmetrics' _sync_dist hands to all_gather, in its order (cat lists pre-concatenated)."""
    leaves = []
    for attr in metric._reductions:
        value = getattr(metric, attr)
        if isinstance(value, list):
            leaves.extend([dim_zero_cat(value)] if len(value) > 1 else value)
        else:
            leaves.append(value)
    return leaves


def fake_ddp_sync(ranks: list[Metric]) -> None:
    """Sync ``ranks[0]`` as rank 0 of a world of ``len(ranks)`` processes, through ``Metric.sync``."""
    others = [iter(_gathered_leaves(m)) for m in ranks[1:]]

    def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:  # noqa: ANN001
        return [tensor, *(next(it) for it in others)]

    ranks[0].sync(dist_sync_fn=all_gather, distributed_available=lambda: True)


def _raw_compute(metric: Metric):  # noqa: ANN202
    return type(metric).compute(metric)  # bypass the wrapper, which would try to sync again


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(9, 3, 23, 27, generator=g)
    image = torch.randn(330, 12, generator=g)
    return {
        "gt": gt,
        "recons": (0.15 * gt + 0.85 * torch.rand(9, 3, 23, 27, generator=g)).clamp(0, 1),
        "image": image,
        "brain": image + 2.0 * torch.randn(330, 12, generator=g),
    }


def _image_batch(data, lo, hi):  # noqa: ANN001, ANN202
    return {"recons": data["recons"][lo:hi], "gt": data["gt"][lo:hi]}


def _embed_batch(data, lo, hi):  # noqa: ANN001, ANN202
    return {"brain_embeds": data["brain"][lo:hi], "image_embeds": data["image"][lo:hi]}


CASES: dict[str, tuple[Callable[[], Metric], Callable, int]] = {
    "pixcorr": (PixCorr, _image_batch, 9),
    "ssim": (SSIM, _image_batch, 9),
    "two_way": (lambda: TwoWayIdentification(build_metric_net("alexnet2", tiny=True)), _image_batch, 9),
    "distance": (lambda: CorrelationDistance(build_metric_net("swav", tiny=True)), _image_batch, 9),
    "retrieval": (Retrieval, _embed_batch, 330),
}


def _values(result) -> list[float]:  # noqa: ANN001
    return [v.item() for v in result.values()] if isinstance(result, dict) else [result.item()]


@pytest.mark.parametrize("case", list(CASES))
def test_synced_halves_equal_one_process(case, data):
    make, batch, n = CASES[case]
    split = n // 2 - 1  # unequal halves
    single, rank0, rank1 = make(), make(), make()
    single.update(**batch(data, 0, n))
    rank0.update(**batch(data, 0, split))
    rank1.update(**batch(data, split, n))
    if case != "retrieval":  # a non-trivial case: one rank alone would report something else
        assert _values(_raw_compute(rank0)) != pytest.approx(_values(single.compute()), abs=1e-6)
    fake_ddp_sync([rank0, rank1])
    assert _values(_raw_compute(rank0)) == pytest.approx(_values(single.compute()), abs=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_state_equals_one_process(case, data):
    make, batch, n = CASES[case]
    single, first, second = make(), make(), make()
    single.update(**batch(data, 0, n))
    first.update(**batch(data, 0, 3))
    second.update(**batch(data, 3, n))
    second.merge_state(first)  # cat states: incoming first, so the order is that of `single`
    assert _values(second.compute()) == pytest.approx(_values(single.compute()), abs=1e-12)
