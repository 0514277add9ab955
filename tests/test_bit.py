"""The BIT and the stage-1 losses: reference vectors, tokenizer conventions, gradients, sizes, errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from brainit_pl.errors import BrainITError
from brainit_pl.models.bit import (
    BIT,
    BIT_LOWLEVEL,
    BIT_REFERENCE,
    BIT_SEMANTIC,
    BIT_TINY,
    BITConfig,
    count_parameters,
)
from brainit_pl.models.losses import infonce_per_scale, semantic_mse
from brainit_pl.models.tokenizer import ClusterGraphAttention, first_occurrence

REFERENCE = Path(__file__).parent / "data" / "brainit_reference.npz"
BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "bit.py"


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
    clusters, centers = model.cluster_of_voxel[ids], model.centers
    counted_twice = model.conv_centers.forward_dense(
        tokens, clusters, torch.ones_like(ids, dtype=torch.bool), centers
    )
    once = model.conv_centers.forward_dense(tokens, clusters, first_occurrence(ids), centers)
    assert (counted_twice - once).abs().max() > 1e-3
    efficient = model.conv_centers(ref["a/x"], ids, model.voxel_embed, model.cluster_of_voxel, centers)
    torch.testing.assert_close(efficient, once, rtol=0, atol=1e-5)


def naive_tokenizer(layer, x, voxel_ids, embed, cluster_of_voxel, centers):
    """The Brain Tokenizer as a loop over samples and clusters: the definition, term by term."""
    k, d = centers.shape
    out = []
    for row, ids in zip(x, voxel_ids.tolist()):
        first = {}  # id → position of its first copy in the sample
        for j, voxel in enumerate(ids):
            first.setdefault(voxel, j)
        tokens = []
        for c in range(k):
            token = layer.lin_skip(centers[c])
            members = [j for voxel, j in first.items() if cluster_of_voxel[voxel] == c]
            if members:
                t = row[members, None] * embed[[ids[j] for j in members]]  # (M, D): t_v = x_v e_v
                a = torch.softmax(
                    layer.lin_key(t) @ layer.lin_query(centers[c]) / math.sqrt(d), dim=0
                )  # (M,)
                token = token + a @ layer.lin_value(t)
            tokens.append(token)
        out.append(torch.stack(tokens))
    return torch.stack(out)  # (B, K, D)


def _tokenizer_inputs(dtype):
    """B=3, V=37, K=5, D=8, a 23-row table; duplicates, and clusters empty in some samples or in all."""
    g = torch.Generator().manual_seed(0)
    b, v, k, d, n = 3, 37, 5, 8, 23
    layer = ClusterGraphAttention(d).to(dtype)
    cluster_of_voxel = torch.randint(0, k - 1, (n,), generator=g)  # cluster 4 has no voxel at all
    cluster_of_voxel[:3] = torch.tensor([0, 1, 2])
    allowed = [torch.arange(n), torch.nonzero(cluster_of_voxel != 2).flatten(), torch.arange(n)]
    voxel_ids = torch.stack([a[torch.randint(0, len(a), (v,), generator=g)] for a in allowed])  # (B, V)
    # copies of a voxel in a sample share its activation, as with sampling with replacement
    x = torch.randn(n, generator=g, dtype=dtype)[voxel_ids] + torch.randn(b, 1, generator=g, dtype=dtype)
    embed = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    centers = torch.randn(k, d, generator=g, dtype=dtype).requires_grad_()
    return layer, x.requires_grad_(), voxel_ids, embed, cluster_of_voxel, centers


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_tokenizer_equals_dense_and_loop_with_gradients(dtype, atol):
    layer, x, ids, embed, cluster_of_voxel, centers = _tokenizer_inputs(dtype)
    clusters = cluster_of_voxel[ids]  # (B, V)
    assert (first_occurrence(ids).sum(1) < ids.shape[1]).all()  # every sample repeats some voxels
    assert not (clusters[1] == 2).any() and not (clusters == 4).any()  # empty clusters
    inputs = [x, embed, centers, *layer.parameters()]
    weights = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def value_and_grads(out):
        return out, torch.autograd.grad((out * weights).sum(), inputs)

    efficient = value_and_grads(layer(x, ids, embed, cluster_of_voxel, centers))
    tokens = x[..., None] * embed[ids]  # (B, V, D)
    dense = value_and_grads(layer.forward_dense(tokens, clusters, first_occurrence(ids), centers))
    loop = value_and_grads(naive_tokenizer(layer, x, ids, embed, cluster_of_voxel, centers))
    # empty clusters get the skip path alone: no value bias
    torch.testing.assert_close(efficient[0][1, 2], layer.lin_skip(centers[2]), rtol=0, atol=atol)
    for (out, grads), tol in ((loop, atol), (dense, 1e-5)):  # dense: its softmax is always float32
        torch.testing.assert_close(efficient[0], out, rtol=0, atol=tol)
        for got, expected in zip(efficient[1], grads):
            torch.testing.assert_close(got, expected, rtol=0, atol=tol)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tokenizer_never_builds_a_voxels_by_width_tensor():
    b, v, k, d, n = 4, 300, 6, 16, 50  # B·V·D = 19,200; table N·D = 800; N·K = 300; B·V = 1,200
    g = torch.Generator().manual_seed(0)
    layer = ClusterGraphAttention(d)
    embed, centers = torch.randn(n, d, requires_grad=True), torch.randn(k, d, requires_grad=True)
    cluster_of_voxel, ids = torch.randint(0, k, (n,), generator=g), torch.randint(0, n, (b, v), generator=g)
    x = torch.randn(b, v, requires_grad=True)
    with LargestTensor() as efficient:
        layer(x, ids, embed, cluster_of_voxel, centers).square().sum().backward()
    with LargestTensor() as dense:
        tokens = x[..., None] * embed[ids]
        layer.forward_dense(
            tokens, cluster_of_voxel[ids], first_occurrence(ids), centers
        ).square().sum().backward()
    assert dense.largest >= b * v * d
    assert efficient.largest <= max(b * v, n * d, b * k * d)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    labels = np.arange(40) % BIT_TINY.n_clusters
    plain = BIT(BIT_TINY, labels)
    checkpointed = BIT(BIT_TINY, labels, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, ids = torch.randn(3, 25), torch.randint(0, 40, (3, 25))
    queries = torch.randint(0, BIT_TINY.n_out, (3, 4))
    weights = torch.randn(3, 4, BIT_TINY.out_dim)
    results = []
    for model in (plain, checkpointed):
        calls = []
        for block in [*model.blocks, *model.block_crosses]:
            # a pre-hook: the recomputation stops once it has what backward needs, before any post-hook
            block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        out = model(x, ids, queries)
        (out * weights).sum().backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}, len(calls)))
    (out, grads, n_plain), (out_ckpt, grads_ckpt, n_ckpt) = results
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-6, msg=name)
    n_blocks = BIT_TINY.n_self + BIT_TINY.n_cross
    assert (n_plain, n_ckpt) == (n_blocks, 2 * n_blocks)  # each checkpointed block ran again in backward
    with torch.no_grad():  # nothing to recompute without gradients
        torch.testing.assert_close(checkpointed(x, ids, queries), out.detach(), rtol=0, atol=1e-6)


def test_init_voxels_from_copies_rows():
    bit = BIT(BIT_TINY, np.arange(12) % BIT_TINY.n_clusters)
    before = bit.voxel_embed.detach().clone()
    # row 2 is both a source and a target: the sources are read before any write
    bit.init_voxels_from(torch.tensor([9, 10, 2]), torch.tensor([2, 2, 9]))
    expected = before.clone()
    expected[[9, 10, 2]] = before[[2, 2, 9]]
    assert torch.equal(bit.voxel_embed.detach(), expected)
    assert bit.voxel_embed.requires_grad and bit.voxel_embed.grad is None
    bit.init_voxels_from(np.array([0]), np.array([11]))  # numpy ids work too
    assert torch.equal(bit.voxel_embed[0].detach(), before[11])
    with pytest.raises(BrainITError, match="repeats"):
        bit.init_voxels_from(torch.tensor([3, 3]), torch.tensor([0, 1]))
    with pytest.raises(BrainITError, match="same"):
        bit.init_voxels_from(torch.tensor([3, 4]), torch.tensor([0]))
    with pytest.raises(BrainITError, match="outside"):
        bit.init_voxels_from(torch.tensor([12]), torch.tensor([0]))
    with pytest.raises(BrainITError, match="integer"):
        bit.init_voxels_from(torch.tensor([1.0]), torch.tensor([0]))


def test_benchmark_quick_run_prints_the_ratios():
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    ratios = [line for line in done.stdout.splitlines() if line.startswith("ratio ")]
    assert [line.split(":")[0] for line in ratios] == [
        f"ratio {preset} {variant}/dense"
        for preset in ("semantic", "lowlevel")
        for variant in ("efficient", "efficient+ckpt")
    ]
    assert all("speed ×" in line and "peak memory ×" in line for line in ratios)


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
    # docs/method.md §4: ~35M (semantic) / ~38M (low-level) besides the voxel table
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


def test_losses_are_float32_under_bf16_autocast():
    """Raw dot-product logits of 512-d tokens are in the hundreds to thousands: bf16 would round them by
    units. Under bf16 autocast both losses equal their float32 values (docs/method.md §5.2)."""
    g = torch.Generator().manual_seed(0)
    pred, target = (4 * torch.randn(4, 13, 512, generator=g) for _ in range(2))  # logits' std 16√512 ≈ 360
    sizes = [4, 4, 2, 2, 1]
    want = infonce_per_scale(pred, target, sizes)
    want_mse = semantic_mse(pred, target.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = infonce_per_scale(pred, target, sizes)
        got_mse = semantic_mse(pred.bfloat16(), target.half())
        naive = (pred @ target.mT).float()  # what autocast alone would give
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6)
    assert (naive - pred @ target.mT).abs().max() > 1.0  # bf16 logits would be off by units
    assert got_mse.dtype == torch.float32
    assert torch.allclose(got_mse, semantic_mse(pred.bfloat16().float(), target.half()), rtol=1e-6)
    assert torch.allclose(got_mse, want_mse, rtol=1e-2)


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
