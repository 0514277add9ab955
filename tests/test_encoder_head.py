"""The Universal Brain Encoder's per-voxel readout: reference vectors, invariants, gradients, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from brainit_pl.errors import BrainITError
from brainit_pl.models.encoder_head import VoxelReadout

REFERENCE = Path(__file__).parent / "data" / "brainit_reference.npz"
# the reference's sizes: 40 voxels, 16-d embeddings, 2 tapped layers, 5 tokens, 8 channels
REF_SIZES = dict(n_voxels=40, n_layers=2, n_tokens=5, token_dim=8, embed_dim=16)


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as z:
        return {k[len("encoder/") :]: torch.from_numpy(z[k]) for k in z.files if k.startswith("encoder/")}


@pytest.fixture()
def readout(ref):
    model = VoxelReadout(**REF_SIZES)
    weights = {k[len("weights/") :]: v for k, v in ref.items() if k.startswith("weights/")}
    model.load_state_dict(weights, strict=True)  # the reference's names load as they are
    return model.eval()


def test_matches_reference(readout, ref):
    with torch.no_grad():
        out = readout(ref["features"], ref["voxel_ids"])
    assert out.shape == ref["out"].shape == (2, 9)
    torch.testing.assert_close(out, ref["out"], rtol=0, atol=1e-5)


def test_each_voxel_depends_only_on_its_own_id(readout, ref):
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    with torch.no_grad():
        out = readout(ref["features"], ref["voxel_ids"])
        permuted = readout(ref["features"], ref["voxel_ids"][:, perm])
        alone = readout(ref["features"], ref["voxel_ids"][:, :1])
    torch.testing.assert_close(permuted, out[:, perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, out[:, :1], rtol=0, atol=1e-6)


def test_shared_voxel_ids_broadcast(readout, ref):
    ids = torch.tensor([3, 17, 39, 0])
    with torch.no_grad():
        shared = readout(ref["features"], ids)
        per_sample = readout(ref["features"], ids.expand(2, -1))
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=0)


def test_dropout_only_in_training(readout, ref):
    with torch.no_grad():
        a = readout(ref["features"], ref["voxel_ids"])
        b = readout(ref["features"], ref["voxel_ids"])
        readout.train()
        torch.manual_seed(0)
        c = readout(ref["features"], ref["voxel_ids"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_gradients_reach_only_the_sampled_voxel_embeddings(ref):
    model = VoxelReadout(**REF_SIZES, dropout=0.0)
    ids = torch.tensor([[1, 5, 5], [7, 2, 30]])
    model(ref["features"], ids).sum().backward()
    grad_rows = model.voxel_embed.grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert grad_rows == [1, 2, 5, 7, 30]
    assert all(p.grad is not None for name, p in model.named_parameters() if name != "voxel_embed")


def test_real_size_defaults():
    model = VoxelReadout(n_voxels=50)
    tokens = torch.randn(2, 5, 257, 128)
    out = model(tokens, torch.randint(0, 50, (2, 7)))
    assert out.shape == (2, 7)
    assert model.feat_embed.shape == (256, 640) and model.pos_embed.shape == (257, 256)
    assert model.mlp[0].fc1.weight.shape == (512, 128)
    # docs/method.md §2: e_v initialised as N(0, 1) · 0.1 / 32
    assert model.voxel_embed.std().item() == pytest.approx(0.1 / 32, rel=0.1)


def test_wrong_token_shape_is_one_clear_error(readout):
    with pytest.raises(BrainITError, match=r"expects tokens \(B, 2, 5, 8\), got \(2, 3, 5, 8\)"):
        readout(torch.zeros(2, 3, 5, 8), torch.zeros(2, 4, dtype=torch.long))
