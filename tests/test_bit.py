"""The BIT and the stage-1 losses: reference vectors, tokenizer conventions, gradients, sizes, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainit_pl.errors import BrainITError
from brainit_pl.models.bit import (
    BIT,
    BIT_LOWLEVEL,
    BIT_REFERENCE,
    BIT_SEMANTIC,
    BIT_TINY,
    BITConfig,
    count_parameters,
    first_occurrence,
)
from brainit_pl.models.losses import infonce_per_scale, semantic_mse

REFERENCE = Path(__file__).parent / "data" / "brainit_reference.npz"


def _section(prefix: str) -> dict[str, torch.Tensor]:
    with np.load(REFERENCE) as z:
        return {k[len(prefix) :]: torch.from_numpy(z[k]) for k in z.files if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ref():
    return _section("bit/")


@pytest.fixture()
def model(ref):
    bit = BIT(BIT_REFERENCE, ref["cluster_of_voxel"])
    weights = {k[len("weights/") :]: v for k, v in ref.items() if k.startswith("weights/")}
    bit.load_state_dict(weights, strict=True)  # the reference's names load as they are
    return bit.eval()


def test_matches_reference(model, ref):
    with torch.no_grad():
        a = model(ref["a/x"], ref["a/voxel_ids"])
        b = model(ref["b/x"], ref["b/voxel_ids"])
        c = model(ref["a/x"], ref["a/voxel_ids"], ref["c/query_ids"])
    assert a.shape == (2, 6, 7) and b.shape == (1, 6, 7) and c.shape == (2, 3, 7)
    torch.testing.assert_close(a, ref["a/out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(b, ref["b/out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(c, ref["c/out"], rtol=0, atol=1e-5)
    # queries never attend to each other: decoding a subset equals gathering rows of the full output
    rows = torch.gather(a, 1, ref["c/query_ids"][..., None].expand(-1, -1, 7))
    torch.testing.assert_close(c, rows, rtol=0, atol=1e-6)


def test_reference_case_a_has_duplicates_that_matter(model, ref):
    """Case a pins deduplication: letting the copies count would change the output."""
    ids = ref["a/voxel_ids"]
    assert (first_occurrence(ids).sum(1) < ids.shape[1]).all()
    tokens = ref["a/x"][..., None] * model.voxel_embed[ids]
    counted_twice = model.conv_centers(
        tokens, model.cluster_of_voxel[ids], torch.ones_like(ids, dtype=torch.bool), model.centers
    )
    once = model.conv_centers(tokens, model.cluster_of_voxel[ids], first_occurrence(ids), model.centers)
    assert (counted_twice - once).abs().max() > 1e-3


def test_first_occurrence():
    ids = torch.tensor([[4, 1, 4, 4, 0, 1], [2, 2, 2, 2, 2, 2]])
    expected = [[True, True, False, False, True, False], [True, False, False, False, False, False]]
    assert first_occurrence(ids).tolist() == expected


def test_order_and_duplicates_do_not_change_the_output(model, ref):
    x, ids = ref["b/x"], ref["b/voxel_ids"]  # one subject-2 sample, every voxel once
    perm = torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))
    extra = torch.tensor([3, 3, 0, 16, 3])  # positions to repeat, some several times
    with torch.no_grad():
        out = model(x, ids)
        permuted = model(x[:, perm], ids[:, perm])
        duplicated = model(torch.cat([x, x[:, extra]], 1), torch.cat([ids, ids[:, extra]], 1))
    torch.testing.assert_close(permuted, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(duplicated, out, rtol=0, atol=1e-6)


def test_empty_cluster_token_is_the_skip_path(model, ref):
    ids = ref["a/voxel_ids"][:1]  # a subject-1 sample: cluster 4 holds only a subject-2 voxel
    assert not (model.cluster_of_voxel[ids] == 4).any()
    with torch.no_grad():
        brain = model.tokenize(ref["a/x"][:1], ids)  # (1, K, D)
        expected = model.norm_centers(F.relu(model.conv_centers.lin_skip(model.centers[4])))
    assert torch.isfinite(brain).all()
    torch.testing.assert_close(brain[0, 4], expected, rtol=0, atol=1e-6)
    assert (brain[0, :4] - expected).abs().amax(dim=1).min() > 1e-3  # the non-empty clusters differ


def test_gradients_reach_only_the_sampled_voxel_embeddings():
    torch.manual_seed(0)
    labels = np.arange(30) % BIT_TINY.n_clusters
    bit = BIT(BIT_TINY, labels)
    ids = torch.tensor([[1, 5, 5, 9], [7, 2, 29, 1]])
    out = bit(torch.randn(2, 4), ids)
    assert out.shape == (2, BIT_TINY.n_out, BIT_TINY.out_dim)
    out.square().mean().backward()
    rows = bit.voxel_embed.grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows == [1, 2, 5, 7, 9, 29]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bit.parameters())


def test_tiny_preset_trains_on_cpu():
    torch.manual_seed(0)
    bit = BIT(BIT_TINY, np.random.default_rng(0).integers(0, BIT_TINY.n_clusters, 50))
    x, ids = torch.randn(3, 40), torch.randint(0, 50, (3, 40))
    target = torch.randn(3, BIT_TINY.n_out, BIT_TINY.out_dim)
    opt = torch.optim.AdamW(bit.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = semantic_mse(bit(x, ids), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    queries = torch.randint(0, BIT_TINY.n_out, (3, 4))
    assert bit(x, ids, queries).shape == (3, 4, BIT_TINY.out_dim)


def test_real_preset_sizes_on_meta_device():
    with torch.device("meta"):
        semantic = BIT(BIT_SEMANTIC, np.zeros(1000, dtype=np.int64))
        lowlevel = BIT(BIT_LOWLEVEL, np.zeros(1000, dtype=np.int64))
    assert semantic.voxel_embed.shape == lowlevel.voxel_embed.shape == (1000, 512)
    assert len(semantic.blocks) == 5 and len(semantic.block_crosses) == 6
    # BRAINIT.md §4: ~35M (semantic) / ~38M (low-level) besides the voxel table
    assert count_parameters(semantic) == 35_188_352
    assert count_parameters(lowlevel) == 38_147_584


def test_config_and_input_errors(ref):
    with pytest.raises(BrainITError, match="divisible by n_heads"):
        BITConfig(dim=30, n_heads=4)
    with pytest.raises(BrainITError, match="n_out"):
        BITConfig(n_out=0)
    with pytest.raises(BrainITError, match="outside"):
        BIT(BIT_REFERENCE, np.array([0, 1, 5]))
    bit = BIT(BIT_REFERENCE, ref["cluster_of_voxel"])
    with pytest.raises(BrainITError, match="same"):
        bit(torch.randn(2, 5), torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(BrainITError, match="query_ids"):
        bit(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_infonce_matches_reference():
    ref = _section("infonce/")
    loss = infonce_per_scale(ref["pred"], ref["target"], ref["tokens_per_scale"].tolist())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5


def test_infonce_contrasts_within_scales_only():
    ref = _section("infonce/")
    pred, target = ref["pred"], ref["target"]
    one_scale = infonce_per_scale(pred, target, [13])
    assert abs(one_scale.item() - infonce_per_scale(pred, target, [4, 4, 2, 2, 1]).item()) > 1e-3
    # a prediction equal to a large multiple of its target is ranked first both ways: loss → 0
    assert infonce_per_scale(10 * target, target, [4, 4, 2, 2, 1]).item() < 1e-3
    with pytest.raises(BrainITError, match="sum to T=13"):
        infonce_per_scale(pred, target, [4, 4, 2, 2])


def test_semantic_mse():
    pred, target = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert semantic_mse(pred, target.half()).dtype == torch.float32
    torch.testing.assert_close(semantic_mse(pred, target), ((pred - target) ** 2).mean())
    with pytest.raises(BrainITError, match="semantic_mse"):
        semantic_mse(pred, target[:, :2])


def test_bfloat16_autocast_stays_close(model, ref):
    with torch.no_grad():
        full = model(ref["a/x"], ref["a/voxel_ids"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ref["a/x"], ref["a/voxel_ids"])
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()
