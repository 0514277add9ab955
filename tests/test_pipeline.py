"""``brainit-pl demo`` end to end on the tiny simulated store (slow: every step of the method trains)."""

import json

import pytest

from brainit_pl.cli import main


@pytest.mark.slow
def test_demo_pipeline_on_the_tiny_store(tiny_store, tmp_path, read_report):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    out = tmp_path / "demo"
    args = ["demo", "--store", str(store), "--out", str(out), "--encoder-epochs", "1", "--bit-epochs", "1"]
    args += [
        "--clusters",
        "4",
        "--n-external",
        "16",
        "--recon-images",
        "2",
        "--dip-steps",
        "2",
        "--stage2-epochs",
        "1",
        "--unclip-epochs",
        "3",
    ]
    assert main(args) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert 0 < summary["noise_ceiling"] < 1
    assert {"val_corr_median", "ridge_val_corr_median"} <= set(summary["encoder"])
    assert {"ari_functional", "ari_anatomical"} <= set(summary["v2c"])
    for model in ("bit", "mindeye2_baseline", "ridge_baseline"):
        assert (
            summary[model]["semantic_val_cos"] is not None and summary[model]["lowlevel_val_2way"] is not None
        )
    comparisons = summary["comparisons"]
    assert set(comparisons) == {"semantic_clip_cos", "semantic_clip_2way", "lowlevel_vgg_2way"}
    assert all(set(c) == {"bit_vs_mindeye2_baseline", "bit_vs_ridge_baseline"} for c in comparisons.values())
    assert len(summary["ridge_baseline"]["lowlevel_test_vgg_2way_ci"]) == 2
    assert {"low_level", "semantic", "semantic_stock", "linear_baseline"} <= set(summary["recon"])
    for stage in ("low_level", "semantic", "semantic_stock", "linear_baseline"):
        low, high = summary["recon"][stage]["pixcorr_ci"]
        assert low <= summary["recon"][stage]["pixcorr"] <= high, stage
    assert (out / "report" / "reconstructions.png").is_file() and (out / "report" / "metrics.json").is_file()
    assert (out / "unclip_pretrain" / "unclip_tiny.ckpt").is_file() and "unclip" in summary["cpu_reductions"]
    assert {"semantic_vs_semantic_stock", "lowlevel_vs_linear"} <= set(summary["recon_comparisons"])
    text, n_images, _ = read_report(out / "report" / "report.html")
    assert "val voxel corr subj01" in text and n_images > 2 * 2 * 5  # the galleries, the maps
    # Every step is skipped the second time.
    timings = summary["timings_s"]
    assert main(args) == 0
    again = json.loads((out / "report" / "summary.json").read_text())
    assert again["timings_s"] == {} and again["bit"] == summary["bit"] and timings


def test_the_configs_the_workflows_run_exist():
    """The demo and transfer-demo read packaged configs: every one they name ships (fast)."""
    import re
    from pathlib import Path

    from brainit_pl.packaged_configs import config_names
    from brainit_pl.workflows.demo import MODELS

    src = Path(__file__).parents[1] / "src" / "brainit_pl" / "workflows"
    named = {
        m for f in src.rglob("*.py") for m in re.findall(r'packaged_config\("([\w/]+)"\)', f.read_text())
    }
    named |= {f"sim/{kind}_{branch}" for kind in MODELS.values() for branch in ("semantic", "lowlevel")}
    assert {"demo", "encoder_demo", "sim/stage2_demo"} <= named
    assert named <= set(config_names())


def test_recon_comparisons_pair_the_same_images(tmp_path):
    """The demo's stage claims: a paired bootstrap per metric, on the images both stages scored."""
    import numpy as np
    import pandas as pd

    from brainit_pl.workflows.demo import recon_comparisons

    rng = np.random.default_rng(0)
    images = [f"{i:05d}.png" for i in range(30)]
    base = rng.normal(0.3, 0.1, 30)
    for stage, shift in (("semantic", 0.05), ("semantic_stock", 0.0), ("lowlevel", 0.0), ("linear", 0.2)):
        folder = tmp_path / f"metrics_{stage}"
        folder.mkdir()
        frame = {"subject": "subj01", "image": images, "pixcorr": base + shift, "swav": 0.5 - base - shift}
        pd.DataFrame(frame).iloc[::-1].to_csv(folder / "per_image.csv", index=False)  # order does not matter
    result = recon_comparisons(tmp_path)
    assert result["semantic_vs_semantic_stock"]["pixcorr"]["verdict"] == "better"
    assert result["semantic_vs_semantic_stock"]["swav"]["verdict"] == "better"  # lower is better
    assert result["lowlevel_vs_linear"]["pixcorr"]["verdict"] == "worse"
    row = result["lowlevel_vs_linear"]["pixcorr"]
    assert abs(row["diff"] + 0.2) < 1e-9 and row["diff_ci"][0] <= row["diff"] + 1e-9  # a constant shift
