"""The BIT's baselines: the MindEye2-style decoder, the closed-form ridge, and the ridge trained through the CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainit_pl.cli import main
from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.data.prepare import prepare
from brainit_pl.data.sim.simulate import simulate
from brainit_pl.features.extract import extract_features
from brainit_pl.lit.ridge import RidgeModule
from brainit_pl.metrics.features import token_cosine
from brainit_pl.models.baselines import MindEye2Decoder
from brainit_pl.models.ridge import RidgeDecoder, fit_ridge

CONFIGS = Path(__file__).parents[1] / "configs" / "sim"
RIDGE_CONFIGS = [CONFIGS / "ridge_semantic.yaml", CONFIGS / "ridge_lowlevel.yaml"]
N_VOXELS = {1: 7, 3: 9}  # unequal, and subject ids that are not 0..S-1


# ---------------------------------------------------------------------------------------- MindEye2
@pytest.fixture()
def mindeye2():
    torch.manual_seed(0)
    return MindEye2Decoder(N_VOXELS, n_out=10, out_dim=6, latent=16, n_blocks=2, query_dim=8).eval()


def _all_ids(subject: int) -> torch.Tensor:
    offset = sum(v for s, v in N_VOXELS.items() if s < subject)
    return offset + torch.arange(N_VOXELS[subject])


def test_mindeye2_shapes_and_query_decoding(mindeye2):
    ids = torch.stack([torch.randint(0, 7, (5,)), 7 + torch.randint(0, 9, (5,)), torch.randint(0, 7, (5,))])
    x = torch.randn(3, 5)
    full = mindeye2(x, ids)
    assert full.shape == (3, 10, 6)
    query = torch.tensor([[0, 9, 3, 3], [1, 2, 8, 0], [5, 5, 5, 6]])
    part = mindeye2(x, ids, query)
    assert part.shape == (3, 4, 6)
    torch.testing.assert_close(part, torch.gather(full, 1, query[..., None].expand(-1, -1, 6)))
    # different positions decode to different tokens (the position code is not ignored)
    assert not torch.allclose(full[:, 0], full[:, 1])


def test_mindeye2_builds_at_real_size_on_the_meta_device():
    with torch.device("meta"):  # NSD nsdgeneral voxel counts of subjects 1, 2, 5, 7; MindEye2's widths
        model = MindEye2Decoder({1: 15724, 2: 14278, 5: 13039, 7: 12682}, n_out=256, out_dim=1664)
    assert model.voxel_embed.shape == (15724 + 14278 + 13039 + 12682, 4096)
    block = 2 * (4096 * 4096 + 4096) + 2 * 4096  # two Linear(4096, 4096) and a LayerNorm
    assert sum(p.numel() for p in model.blocks.parameters()) == 4 * block


def test_mindeye2_pool_is_a_per_subject_linear_map(mindeye2):
    x = torch.randn(4, 9)
    ids = _all_ids(3).expand(4, -1)
    weight = mindeye2.voxel_embed[7:16]  # (V_3, latent): subject 3 is the second in sorted order
    expected = x @ weight + mindeye2.subject_bias[1]
    torch.testing.assert_close(mindeye2.pool(x, ids), expected)
    perm = torch.randperm(9)
    torch.testing.assert_close(mindeye2.pool(x[:, perm], ids[:, perm]), expected)
    # k = 2·V_s samples holding every voxel twice: the (V_s / k)-scaled sum is the same linear map
    torch.testing.assert_close(mindeye2.pool(x.repeat(1, 2), ids.repeat(1, 2)), expected)


def test_mindeye2_gradients_reach_only_the_sampled_voxels(mindeye2):
    ids = torch.tensor([[0, 2, 2], [7, 8, 15]])
    mindeye2.train()(torch.randn(2, 3), ids).square().mean().backward()
    touched = mindeye2.voxel_embed.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == [0, 2, 7, 8, 15]
    assert all(p.grad is not None for n, p in mindeye2.named_parameters() if n != "voxel_embed")


# ------------------------------------------------------------------------------------------- ridge
def _data(n, v, f, seed=0, noise=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v)) * rng.uniform(0.5, 3, size=v) + rng.normal(size=v)
    y = x @ rng.normal(size=(v, f)) + noise * rng.normal(size=(n, f)) + 5.0
    return x, y, rng.normal(size=(11, v))


@pytest.mark.parametrize(
    ("n", "v", "form"),
    [(40, 7, None), (9, 30, None), (9, 30, "primal"), (13, 30, "dual"), (30, 30, "primal")],
    ids=["primal", "dual-small-F", "dual-stored-primal", "dual", "n=V"],
)
def test_ridge_matches_sklearn(n, v, form):
    x, y, x_new = _data(n, v, 6)
    sol = fit_ridge(
        torch.tensor(x), torch.tensor(y), [2.5], standardize=False, form=form, dtype=torch.float64
    )
    assert (sol.coef is None) == (form == "dual")
    expected = Ridge(alpha=2.5, fit_intercept=True).fit(x, y).predict(x_new)
    np.testing.assert_allclose(sol.predict(torch.tensor(x_new)).numpy(), expected, rtol=1e-9, atol=1e-9)
    # standardised with the training statistics = sklearn's StandardScaler in front
    sol = fit_ridge(torch.tensor(x), torch.tensor(y), [2.5], form=form, dtype=torch.float64)
    expected = make_pipeline(StandardScaler(), Ridge(alpha=2.5)).fit(x, y).predict(x_new)
    np.testing.assert_allclose(sol.predict(torch.tensor(x_new)).numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("n", "v"), [(40, 7), (13, 30)], ids=["primal", "dual"])
def test_ridge_leave_one_out_matches_sklearn_ridgecv(n, v):
    x, y, _ = _data(n, v, 5, seed=1)
    alphas = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    sol = fit_ridge(torch.tensor(x), torch.tensor(y), alphas, standardize=False)
    cv = RidgeCV(alphas=alphas, fit_intercept=True).fit(x, y)
    assert sol.alpha == cv.alpha_ and 0 < sol.alphas.tolist().index(sol.alpha) < len(alphas) - 1
    np.testing.assert_allclose(float(sol.loo_mse.min()), -cv.best_score_, rtol=1e-9)


@pytest.mark.parametrize(("n", "v"), [(400, 60), (150, 400)], ids=["primal", "dual"])
def test_ridge_recovers_a_linear_map(n, v):
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(8, v))  # betas in a low-dimensional subspace, so that n < V is learnable too
    w = rng.normal(size=(v, 20))

    def draw(m):
        x = rng.normal(size=(m, 8)) @ basis + 0.05 * rng.normal(size=(m, v))
        return torch.tensor(x), torch.tensor(x @ w + 0.1 * rng.normal(size=(m, 20)))

    x, y = draw(n)
    x_test, y_test = draw(200)
    sol = fit_ridge(x, y.half(), relative=True)  # float16 targets, as RidgeModule accumulates them
    assert sol.coef.dtype == torch.float32
    resid = (sol.predict(x_test) - y_test).square().sum()
    r2 = 1 - resid / (y_test - y_test.mean(0)).square().sum()
    assert r2 > 0.95


@pytest.mark.parametrize("form_n", [30, 5], ids=["primal", "dual"])
def test_ridge_decoder_state_dict_roundtrip(form_n):
    x, y = torch.randn(form_n, 9), torch.randn(form_n, 4, 3)
    ridge = RidgeDecoder(N_VOXELS)
    sol = ridge.fit(3, x, y)
    assert (sol.coef is None) == (form_n == 5)  # n (V + F) < V F: the dual form is smaller
    assert ridge.fitted(3) and not ridge.fitted(1)
    fresh = RidgeDecoder(N_VOXELS)
    fresh.load_state_dict(ridge.state_dict(), strict=True)  # buffers take the checkpoint's shapes
    x_new = torch.randn(2, 9)
    expected = sol.predict(x_new).view(2, 4, 3)
    torch.testing.assert_close(fresh(x_new, 3), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("config", RIDGE_CONFIGS, ids=lambda p: p.name)
def test_ridge_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "brainit_pl.lit.ridge.RidgeModule" in capsys.readouterr().out


@pytest.fixture(scope="module")
def clip_store(tiny_store, tmp_path_factory):
    """A copy of the tiny store with the tiny CLIP twin's token cache. Read-only."""
    store = tmp_path_factory.mktemp("ridge") / "store"
    shutil.copytree(tiny_store, store)
    extract_features(store, tiny=True, batch_size=8)
    return store


def _fit_args(config, store, root, *extra):
    return [
        "fit",
        *("--config", str(config), "--data.store", str(store), "--trainer.default_root_dir", str(root)),
        *("--data.num_workers", "0", "--data.val_fraction", "0.3", "--trainer.enable_progress_bar", "false"),
        *extra,
    ]


def _fit(config, store, root, *extra):
    assert main(_fit_args(config, store, root, *extra)) == 0
    (ckpt,) = root.rglob("last.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    (best,) = [v["best_model_score"] for k, v in checkpoint["callbacks"].items() if "ModelCheckpoint" in k]
    return ckpt, checkpoint, float(best)  # the monitored val metric


def _predict_split(model, store, split, **data):
    dm = NSDDataModule(str(store), voxels_per_sample=None, val_fraction=0.3, eval_batch_size=4, **data)
    preds, targets = [], []
    for batch in dm.make_dataloader(split):
        subject = model.batch_subject(batch)
        preds.append(model(batch["betas"], subject))
        targets.append(model.targets(batch))
    return torch.cat(preds), torch.cat(targets)


def test_semantic_ridge_fits_through_the_cli(clip_store, tmp_path, capsys):
    ckpt, checkpoint, val_cos = _fit(RIDGE_CONFIGS[0], clip_store, tmp_path / "fit")
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 1)  # one epoch, one fit
    state = checkpoint["state_dict"]
    assert state["ridge.target_shape"].tolist() == [256, 32]
    assert {k.split(".")[2] for k in state if k.startswith("ridge.subjects.")} == {"1", "2"}

    model = RidgeModule.load_from_checkpoint(ckpt).eval()
    pred, target = _predict_split(model, clip_store, "val", features=["clip"])
    assert abs(float(token_cosine(pred, target).mean()) - val_cos) < 1e-5  # what fit logged
    assert float(pred.std(0).mean()) > 1e-3  # not a constant prediction
    # (20 images per subject carry no learnable signal for the random CLIP twin: see the slow test below)

    code = main(
        [
            "test",
            *("--config", str(RIDGE_CONFIGS[0]), "--data.store", str(clip_store)),
            *("--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "test")),
            *("--ckpt_path", str(ckpt)),
        ]
    )
    assert code == 0 and "test/clip_cos" in capsys.readouterr().out


@pytest.fixture(scope="module")
def larger_clip_store(tmp_path_factory):
    """The tiny preset with 8 sessions (120 images per subject) and its CLIP cache. Read-only."""
    root = tmp_path_factory.mktemp("ridge_larger")
    store = prepare(simulate(root / "nsd", preset="tiny", seed=0, sessions=8), root / "store")
    extract_features(store, tiny=True, batch_size=16)
    return store


@pytest.mark.slow
def test_semantic_ridge_beats_chance(larger_clip_store, tmp_path):
    ckpt, _, val_cos = _fit(
        RIDGE_CONFIGS[0], larger_clip_store, tmp_path / "fit", "--data.val_fraction", "0.2"
    )
    model = RidgeModule.load_from_checkpoint(ckpt).eval()
    pred, target = _predict_split(model, larger_clip_store, "test", features=["clip"])
    cos = torch.stack(
        [token_cosine(pred, target.roll(k, 0)) for k in range(len(pred))]
    )  # (N, N), row 0 matched
    identification = float((cos[0] > cos[1:]).float().mean())  # chance 0.5
    assert identification > 0.55, identification  # 0.574 on 80 test images (6,320 pairs)
    assert val_cos > float(cos[1:].mean()), val_cos  # the logged score beats mismatched pairs


def test_lowlevel_ridge_fits_through_the_cli(tiny_store, tmp_path):
    # One subject (14 training, 6 val images): the VGG twin costs ~0.4 s per 112² image on 2 CPU cores.
    _, checkpoint, val_2way = _fit(RIDGE_CONFIGS[1], tiny_store, tmp_path / "fit", "--data.subjects", "[2]")
    state = checkpoint["state_dict"]
    assert not any("vgg" in k for k in state)  # the frozen VGG stays out of the checkpoint
    assert state["ridge.target_shape"].tolist() == [240, 64]  # the eval positions only (slim VGG twin)
    assert 0.0 <= val_2way <= 1.0  # 14 images do not show learning: test_lowlevel_ridge_beats_chance does


@pytest.mark.slow
def test_lowlevel_ridge_beats_chance(larger_clip_store, tmp_path):
    _, _, val_2way = _fit(RIDGE_CONFIGS[1], larger_clip_store, tmp_path / "fit", "--data.val_fraction", "0.2")
    assert val_2way > 0.55, val_2way  # chance 0.5; 0.572 on its 48 val images (recalibrated twin)


def test_ridge_refuses_sampled_voxels(tiny_store, tmp_path, stderr_lines):
    args = _fit_args(RIDGE_CONFIGS[1], tiny_store, tmp_path, "--data.voxels_per_sample", "16")
    assert main(args) == 2
    assert "data.voxels_per_sample: null" in stderr_lines()[-1]


@pytest.mark.slow
def test_ridge_under_ddp_equals_one_process(clip_store, tmp_path):
    """Two CPU processes (gloo): the gathered fit equals the single-process one."""
    _, single, _ = _fit(RIDGE_CONFIGS[0], clip_store, tmp_path / "one")
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    }
    args = _fit_args(RIDGE_CONFIGS[0], clip_store, tmp_path / "two", "--trainer.strategy", "ddp")
    proc = subprocess.run(
        [sys.executable, "-m", "brainit_pl.cli", *args, "--trainer.devices", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp_path / "two").rglob("last.ckpt")
    double = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for key in ("ridge.subjects.1.alpha", "ridge.subjects.2.x_mean"):
        torch.testing.assert_close(double[key], single["state_dict"][key], rtol=1e-5, atol=1e-6)
    x = torch.randn(3, single["state_dict"]["ridge.subjects.1.x_mean"].numel())
    outs = []
    for state in (single["state_dict"], double):
        ridge = RidgeDecoder({1: x.shape[1], 2: state["ridge.subjects.2.x_mean"].numel()})
        ridge.load_state_dict({k[len("ridge.") :]: v for k, v in state.items() if k.startswith("ridge.")})
        outs.append(ridge(x, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert F.mse_loss(outs[0], outs[1]) < 1e-8
