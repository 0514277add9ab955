"""Per-image test scores of the feature models (test_scores.csv) and the comparison of two models with intervals."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.metrics.compare import compare_scores, find_test_scores, read_test_scores, write_test_scores
from brainit_pl.metrics.features import SampleKeys, feature_quality, per_image_quality
from brainit_pl.workflows.demo import _add_test_intervals
from test_bit_lit import _args, _scalars
from test_fit import DIST_VARS

ROOT = Path(__file__).parents[1]
RIDGE_SEMANTIC = ROOT / "configs" / "sim" / "ridge_semantic.yaml"


# ------------------------------------------------------------------------------ per-image values
def test_per_image_values_average_to_the_metrics():
    torch.manual_seed(0)
    quality, keys = feature_quality("semantic", "test/", n_tokens=16), SampleKeys()
    for b in range(3):  # batches of unequal size
        pred, target = torch.randn(4 + b, 16, 8), torch.randn(4 + b, 16, 8)
        quality.update(pred + 0.5 * target, target)
        keys.update(torch.full((4 + b,), b + 1), torch.arange(4 + b) * 10)
    rows, values = per_image_quality(quality, keys)
    assert rows.shape == (15, 2) and rows[:4, 0].tolist() == [1] * 4 and rows[-1].tolist() == [3, 50]
    for name, logged in quality.compute().items():
        per_image = values[name.split("/")[1]]
        assert per_image.shape == (15,)
        assert float(per_image.mean()) == pytest.approx(float(logged), abs=1e-6)
    assert float(quality.compute()["test/clip_2way"]) > 0.5  # informative predictions


def test_scores_csv_round_trip(tmp_path):
    path = tmp_path / "test_scores.csv"
    write_test_scores(path, torch.tensor([[1, 5], [1, 7], [2, 5]]), {"clip_cos": np.array([0.1, 0.2, 0.3])})
    assert path.read_text().splitlines()[:2] == ["subject,nsd_id,metric,value", "1,5,clip_cos,0.1"]
    assert read_test_scores(path) == {"clip_cos": {(1, 5): 0.1, (1, 7): 0.2, (2, 5): 0.3}}


# ------------------------------------------------------------------------------ through the CLI
def _check_scores(run: Path) -> None:
    """test_scores.csv: one row per test sample and metric, each metric's mean the logged test value."""
    path = find_test_scores(run)
    assert path is not None and path.parent.name.startswith("version_")
    scores, logged = read_test_scores(path), _scalars(run)
    assert set(scores) == {"clip_cos", "clip_2way"}
    n_rows = len(path.read_text().splitlines()) - 1
    assert n_rows == 2 * len(scores["clip_cos"]) == 2 * len(scores["clip_2way"])  # unique (subject, nsd_id)
    assert {s for s, _ in scores["clip_cos"]} == {1, 2}
    for name, values in scores.items():
        assert np.mean(list(values.values())) == pytest.approx(logged[f"test/{name}"][-1], abs=1e-6)


def test_bit_and_ridge_write_test_scores(bit_store, tmp_path):
    fit = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert main(_args(bit_store, tmp_path / "bit_fit", *fit)) == 0
    ckpt = str(next((tmp_path / "bit_fit").rglob("last.ckpt")))
    assert main(_args(bit_store, tmp_path / "bit", "--ckpt_path", ckpt, command="test")) == 0
    _check_scores(tmp_path / "bit")

    common = ("--config", str(RIDGE_SEMANTIC), "--data.store", str(bit_store), "--data.num_workers", "0")
    common += ("--trainer.enable_progress_bar", "false")
    assert main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "ridge_fit")]) == 0
    ckpt = str(next((tmp_path / "ridge_fit").rglob("last.ckpt")))
    test = ("--trainer.default_root_dir", str(tmp_path / "ridge"), "--ckpt_path", ckpt)
    assert main(["test", *common, *test]) == 0
    _check_scores(tmp_path / "ridge")

    bit, ridge = (read_test_scores(find_test_scores(tmp_path / run)) for run in ("bit", "ridge"))
    assert set(bit["clip_cos"]) == set(ridge["clip_cos"])  # the same test samples: comparable
    assert compare_scores(bit["clip_cos"], ridge["clip_cos"])["verdict"] in ("better", "worse", "tie")


def test_test_scores_under_ddp(bit_store, tmp_path):
    """2-process gloo DDP: one file (rank 0) with every test sample once, and the single process's values."""
    fit = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert main(_args(bit_store, tmp_path / "fit", *fit)) == 0
    ckpt = str(next((tmp_path / "fit").rglob("last.ckpt")))
    assert main(_args(bit_store, tmp_path / "single", "--ckpt_path", ckpt, command="test")) == 0
    ddp = (
        "--ckpt_path",
        ckpt,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--data.batch_size",
        "4",
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    cmd = [sys.executable, "-m", "brainit_pl.cli", *_args(bit_store, tmp_path / "ddp", *ddp, command="test")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "ddp").rglob("test_scores.csv")
    _check_scores(tmp_path / "ddp")
    single, ddp_scores = read_test_scores(find_test_scores(tmp_path / "single")), read_test_scores(path)
    for name, values in single.items():
        assert ddp_scores[name] == pytest.approx(values, abs=1e-5), name


# ------------------------------------------------------------------------------ comparisons
def _table(values: np.ndarray) -> dict[tuple[int, int], float]:
    return {(1 + k % 2, k): float(v) for k, v in enumerate(values)}


def test_compare_a_clear_win_and_a_loss():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, size=200)
    noise = rng.normal(0, 0.02, size=200)
    result = compare_scores(_table(base + 0.1 + noise), _table(base))
    assert result["verdict"] == "better" and result["n_images"] == 200
    assert result["diff"] == pytest.approx(0.1, abs=0.01)
    low, high = result["diff_ci"]
    assert 0 < low < result["diff"] < high
    for side, mean in (("a", (base + 0.1 + noise).mean()), ("b", base.mean())):
        assert result[side]["mean"] == pytest.approx(mean)
        assert result[side]["ci"][0] < mean < result[side]["ci"][1]
    assert compare_scores(_table(base), _table(base + 0.1 + noise))["verdict"] == "worse"
    # a distance: lower is better
    assert compare_scores(_table(base), _table(base + 0.1), higher_is_better=False)["verdict"] == "better"


def test_compare_a_tie():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.7, size=200)
    result = compare_scores(_table(base + rng.normal(0, 0.05, size=200)), _table(base))
    assert result["verdict"] == "tie"
    low, high = result["diff_ci"]
    assert low < 0 < high


def test_compare_pairs_by_sample_not_by_order():
    values = np.linspace(0, 1, 50)
    a = _table(values + 0.05)
    b = dict(reversed(list(_table(values).items())))  # the same samples, listed the other way round
    result = compare_scores(a, b)
    assert result["diff"] == pytest.approx(0.05) and result["diff_ci"] == pytest.approx([0.05, 0.05])


def test_compare_refuses_different_samples():
    with pytest.raises(BrainITError, match="same test samples"):
        compare_scores({(1, 1): 0.5, (1, 2): 0.4}, {(1, 1): 0.5, (1, 3): 0.4})


# ------------------------------------------------------------------------------ the demo's summary and the benchmark
def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "bit_vs_baselines", ROOT / "benchmarks" / "bit_vs_baselines.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_summary_gains_intervals_and_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    keys = torch.tensor([[1 + k % 2, k] for k in range(100)])
    base = rng.uniform(0.3, 0.7, size=100)
    models = {
        "bit": base + 0.1,
        "mindeye2_baseline": base,
        "ridge_baseline": base + 0.1 + rng.normal(0, 0.05, 100),
    }
    summary: dict = {}
    for key, values in models.items():  # the demo's order: the BIT first
        folder = tmp_path / "semantic" / key / "test" / "lightning_logs" / "version_0"
        folder.mkdir(parents=True)
        write_test_scores(folder / "test_scores.csv", keys, {"clip_cos": values, "clip_2way": values})
        summary[key] = {"semantic_test_clip_cos": float(values.mean())}
        _add_test_intervals(summary, tmp_path, "semantic", key)

    for key, values in models.items():
        low, high = summary[key]["semantic_test_clip_cos_ci"]
        assert low < values.mean() < high and summary[key]["semantic_test_clip_2way_ci"] == [low, high]
    assert set(summary["comparisons"]) == {"semantic_clip_cos", "semantic_clip_2way"}
    cos = summary["comparisons"]["semantic_clip_cos"]
    assert set(cos) == {"bit_vs_mindeye2_baseline", "bit_vs_ridge_baseline"}
    assert cos["bit_vs_mindeye2_baseline"]["verdict"] == "better"
    assert cos["bit_vs_mindeye2_baseline"]["diff"] == pytest.approx(0.1)
    assert (
        cos["bit_vs_ridge_baseline"]["verdict"] == "tie" and cos["bit_vs_ridge_baseline"]["n_images"] == 100
    )

    benchmark = _benchmark()
    text = "\n".join(benchmark.table(summary))
    assert "| semantic_clip_cos | bit_vs_mindeye2_baseline | +0.100 |" in text and "| tie |" in text
    assert f"{summary['bit']['semantic_test_clip_cos']:.3f} [" in text
    assert json.loads(json.dumps(benchmark.results(summary)))["comparisons"] == summary["comparisons"]


def test_demo_summary_without_test_scores(tmp_path):
    summary = {"bit": {}, "ridge_baseline": {}}
    for key in summary:
        _add_test_intervals(summary, tmp_path, "lowlevel", key)
    assert summary["ridge_baseline"] == {"lowlevel_test_vgg_2way_ci": None} and "comparisons" not in summary
