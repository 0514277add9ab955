"""``brainit-pl transfer-demo``: the report assembly on fabricated step outputs, the command lines it runs,
its early one-line refusals, and (slow) the whole experiment on the tiny store, re-run to check the skips."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.workflows.demo import best_checkpoint
from brainit_pl.workflows.transfer.demo import TransferDemo, add_arguments
from brainit_pl.workflows.transfer.report import (
    VARIANTS,
    build_summary,
    metrics_json,
    metrics_markdown,
    recon_metrics,
    save_grid,
    subject_noise_ceiling,
    variant_record,
)
from brainit_pl.workflows.transfer.subject import check_subject, demo_checkpoints


def _metrics(pixcorr: float, two_way: float) -> dict:
    """A stage's ``mean`` dict as ``reconstruct`` writes it (retrieval not computed)."""
    names = ("alexnet2", "alexnet5", "inception", "clip")
    return {"pixcorr": pixcorr, "ssim": 0.4, **dict.fromkeys(names, two_way), "effnet": 0.8, "swav": 0.4,
            "retrieval_image": None, "retrieval_brain": None}  # fmt: skip


def _record(cos: float, clip2: float, vgg2: float, pixcorr: float) -> dict:
    features = {"semantic_val_cos": cos, "semantic_val_2way": clip2, "lowlevel_val_2way": vgg2}
    return variant_record(features, {"low_level": _metrics(pixcorr, 0.7), "semantic": _metrics(0.0, 0.5)})


@pytest.fixture
def variants():
    return {
        "transfer": _record(0.90, 0.70, 0.60, 0.20),
        "transfer_random_init": _record(0.85, 0.65, 0.55, 0.15),
        "scratch": _record(0.60, 0.55, 0.50, 0.10),
        "all_data": _record(0.95, 0.75, 0.64, 0.25),
    }


def _summary(variants, **kw):
    return build_summary(
        subject=4, hours=1.0, base_subjects=[1, 2, 3], variants=variants, noise_ceiling=0.36,
        timings={"base encoder": 12.345}, scoring="subject 4's shared images", extra={"v2c": {"k": 25}}, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- the report
def test_summary_has_the_issue_keys_and_the_ratios(variants):
    summary = _summary(variants)
    assert {"noise_ceiling", "transfer", "timings_s", "v2c"} <= set(summary)
    t = summary["transfer"]
    assert t["hours"] == 1.0 and t["base_subjects"] == [1, 2, 3]
    for name in VARIANTS:
        assert {"semantic_val_cos", "lowlevel_val_2way", "recon"} <= set(t[name]), name
        assert set(t[name]["recon"]) == {"low_level", "semantic"}
    assert summary["timings_s"] == {"base encoder": 12.3}
    to_all, to_scratch = t["ratios"]["transfer/all_data"], t["ratios"]["transfer/scratch"]
    assert to_all["semantic_val_cos"] == pytest.approx(0.90 / 0.95)
    assert to_all["lowlevel_val_2way"] == pytest.approx(0.60 / 0.64)
    assert to_scratch["low_level.pixcorr"] == pytest.approx(2.0)
    assert to_scratch["low_level.effnet"] == pytest.approx(1.0)
    assert to_scratch["semantic.pixcorr"] is None  # 0 in the denominator
    assert to_all["low_level.retrieval_image"] is None  # not computed
    json.dumps(summary, allow_nan=False)  # plain JSON, no NaN


def test_non_finite_numbers_become_null_and_a_missing_variant_drops_its_ratio(variants):
    record = variant_record({"semantic_val_cos": float("nan")}, {"low_level": {"pixcorr": math.inf}})
    assert record["semantic_val_cos"] is None and record["lowlevel_val_2way"] is None
    assert record["recon"]["low_level"]["pixcorr"] is None
    del variants["scratch"]
    summary = _summary(variants)
    assert (
        list(summary["transfer"]["ratios"]) == ["transfer/all_data"] and "scratch" not in summary["transfer"]
    )
    assert "scratch" not in metrics_markdown(summary)


def test_metrics_table_and_json(variants):
    summary = _summary(variants)
    text = metrics_markdown(summary, n_images=6)
    for label in VARIANTS.values():
        assert text.count(f"| {label} |") == 3  # feature prediction + the two stages
    assert "| transfer (NN init) | 0.900 | 70.0% | 60.0% |" in text
    assert "| CLIP cos↑ | 0.947 | 1.500 |" in text  # ratios: transfer / all data, transfer / scratch
    assert "| low_level: PixCorr↑ | 0.800 | 2.000 |" in text
    assert "ret." not in text  # a metric nobody computed has no column and no ratio row
    out = metrics_json(summary)
    assert set(out["stages"]) == {"low_level", "semantic"} and set(out["stages"]["low_level"]) == set(
        VARIANTS
    )
    assert out["stages"]["low_level"]["scratch"]["pixcorr"] == 0.10
    assert out["feature_prediction"]["all_data"]["semantic_val_cos"] == 0.95


def test_recon_metrics_and_the_grid(tmp_path):
    from PIL import Image

    folders = {}
    for v, shade in (("transfer", 60), ("all data", 200)):
        root = folders.setdefault(v, tmp_path / v)
        for sub in ("gt/subj04", "subj04/lowlevel", "subj04/semantic"):
            (root / sub).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), shade, np.uint8)).save(root / sub / f"0000{i}.png")
        (root / "metrics_lowlevel").mkdir()
        (root / "metrics_lowlevel" / "metrics.json").write_text(json.dumps({"mean": {"pixcorr": 0.3}}))
    assert recon_metrics(folders["transfer"]) == {"low_level": {"pixcorr": 0.3}}
    save_grid(tmp_path / "grid.png", folders, subject=4, n_images=2)
    width, height = Image.open(tmp_path / "grid.png").size
    assert height > width  # 5 rows (ground truth + 2 variants × 2 stages) of 2 images


# --------------------------------------------------------------------------------- inputs, refusals
def test_subject_checks(tiny_store):
    assert check_subject(tiny_store, None, 1.0, 0.3, 0) == (2, [1])  # default: the store's last
    with pytest.raises(BrainITError, match="subject 7 is not in the store"):
        check_subject(tiny_store, 7, 1.0, 0.3, 0)
    with pytest.raises(BrainITError, match="too little data for --hours 0.05"):
        check_subject(tiny_store, 2, 0.05, 0.3, 0)
    with pytest.raises(BrainITError, match="needs 5 sessions"):
        check_subject(tiny_store, 2, 5, 0.3, 0)


def test_subject_noise_ceiling(tiny_store):
    from brainit_pl.data.store import Store

    snr2 = Store(tiny_store).subject(2).ncsnr.astype(np.float64) ** 2
    assert subject_noise_ceiling(tiny_store, 2) == pytest.approx(float(np.mean(snr2 / (snr2 + 1 / 3))))
    assert 0 < subject_noise_ceiling(tiny_store, 2) < 1


def test_demo_checkpoints_are_found_as_the_demo_finds_them(tmp_path):
    assert demo_checkpoints(None) is None and demo_checkpoints(tmp_path / "nothing") is None
    for branch in ("semantic", "lowlevel"):
        ckpts = tmp_path / branch / "bit" / "fit" / "lightning_logs" / "version_0" / "checkpoints"
        ckpts.mkdir(parents=True)
        (ckpts / "last.ckpt").touch()
        (ckpts / "epoch=3-step=40.ckpt").touch()
        (tmp_path / branch / "bit" / "fit" / "done").touch()
    found = demo_checkpoints(tmp_path)
    assert found is not None and found["lowlevel"].name == "epoch=3-step=40.ckpt"
    for p in (tmp_path / "semantic").rglob("*.ckpt"):
        p.unlink()
    with pytest.raises(BrainITError, match="holds no checkpoint"):
        best_checkpoint(tmp_path / "semantic")


def test_bad_input_is_one_line(tiny_store, tmp_path, stderr_lines):
    argv = ["transfer-demo", "--store", str(tiny_store), "--out", str(tmp_path / "out")]
    assert main([*argv, "--subject", "7"]) == 2
    (line,) = stderr_lines()
    assert "subject 7 is not in the store" in line
    assert (
        main([*argv, "--all-data", str(tmp_path / "none"), "--no-train-all-data", "--val-fraction", "0.3"])
        == 2
    )
    (line,) = stderr_lines()
    assert "holds no finished BITs of `make demo`" in line
    assert main([*argv, "--transfer-epochs", "0"]) == 2
    (line,) = stderr_lines()
    assert "must be >= 1: {'--transfer-epochs': 0}" in line


# ------------------------------------------------------------------------------- the command lines
class FakeShell:
    """Records ``brainit-pl`` command lines instead of running them, and leaves the outputs steps wait for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *argv: str) -> None:
        self.calls.append(argv)
        opt = lambda flag: Path(argv[argv.index(flag) + 1])  # noqa: E731
        if argv[0] == "fit":
            ckpts = opt("--trainer.default_root_dir") / "lightning_logs" / "version_0" / "checkpoints"
            ckpts.mkdir(parents=True)
            (ckpts / "last.ckpt").touch()
        elif argv[0] == "cluster":
            opt("--out").mkdir(parents=True)
            (opt("--out") / "clusters.npz").touch()
        elif argv[0] == "extract-features":
            (opt("--store") / "features_clip.h5").touch()
        elif argv[0] == "synthesize-fmri":
            opt("--out").mkdir(parents=True)
        elif argv[0] == "transfer":
            for step in ("encoder", "v2c", "synthetic"):
                (opt("--out") / step).mkdir(parents=True, exist_ok=True)
                (opt("--out") / step / "result.json").write_text("{}")
            (opt("--out") / "summary.json").write_text(json.dumps({"timings_s": {"encoder": 1.0}}))

    def value(self, command: str, flag: str) -> list[str]:
        return [c[c.index(flag) + 1] for c in self.calls if c[0] == command and flag in c]


def _args(store, out, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--store", str(store), "--out", str(out), "--all-data", str(out / "none"), *extra]
    )


def test_base_models_never_see_the_held_out_subject(tiny_store, tmp_path, monkeypatch):
    args = ("--val-fraction", "0.3", "--bit-epochs", "4", "--base-external-ratio", "1")
    demo = TransferDemo(_args(tiny_store, tmp_path, *args))
    shell = FakeShell()
    monkeypatch.setattr(demo, "sh", shell)
    base = demo.base_models(tmp_path / "base")
    assert [c[0] for c in shell.calls] == [
        "fit",
        "cluster",
        "synthesize-fmri",
        "extract-features",
        "fit",
        "fit",
    ]
    assert shell.value("fit", "--data.subjects") == ["[1]"] * 3  # encoder and both BITs: subject 1 only
    assert shell.value("fit", "--data.external_ratio") == ["1.0", "1.0"]
    assert shell.value("fit", "--model.init_args.warmup_epochs") == ["2", "2"]  # half of 4 epochs
    assert shell.value("fit", "--model.init_args.clusters") == [str(base["clusters"])] * 2
    assert base["external"] == tmp_path / "base" / "synthetic"
    # the transfer, its random-init twin (which links the init-free steps), scratch on the same hour
    nn = demo.transfer("transfer", tmp_path / "transfer", base, 1.0, "nn")
    rand = demo.transfer("random", tmp_path / "random", base, 1.0, "random", share=nn)
    assert shell.value("transfer", "--init") == ["nn", "random"]
    assert shell.value("transfer", "--subject") == ["2", "2"]
    assert shell.value("transfer", "--epochs-stage2") == ["0", "0"]
    assert (rand / "encoder").is_symlink() and (rand / "v2c").resolve() == (nn / "v2c").resolve()
    assert demo.timings["transfer: encoder"] == 1.0  # the transfer command's own steps, for the report
    demo.fit_model("scratch", tmp_path / "scratch", "bit", "semantic", [2], clusters=nn / "v2c" / "c.npz",
                   epochs=40, hours=1.0)  # fmt: skip
    scratch = shell.calls[-1]
    assert scratch[scratch.index("--data.subjects") + 1] == "[2]" and "--data.external" not in scratch
    assert scratch[scratch.index("--data.hours") + 1] == "1.0"
    assert scratch[scratch.index("--data.val_fraction") + 1] == "0.3"
    # a second pass runs nothing: every step is done
    before = len(shell.calls)
    demo.base_models(tmp_path / "base")
    demo.transfer("transfer", tmp_path / "transfer", base, 1.0, "nn")
    assert len(shell.calls) == before


def test_base_bits_train_on_real_samples_only_with_ratio_zero(tiny_store, tmp_path, monkeypatch):
    demo = TransferDemo(_args(tiny_store, tmp_path, "--val-fraction", "0.3", "--base-external-ratio", "0"))
    shell = FakeShell()
    monkeypatch.setattr(demo, "sh", shell)
    assert demo.base_models(tmp_path / "base")["external"] is None
    assert [c[0] for c in shell.calls] == ["fit", "cluster", "fit", "fit"]
    assert not any("--data.external" in c for c in shell.calls)
    assert shell.value("fit", "--trainer.max_epochs") == ["6", "10", "10"]  # encoder, then both BITs


# -------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_transfer_demo_end_to_end_on_the_tiny_store(bit_store, tmp_path, capsys):
    """Every step on the tiny store (the all-data models trained by the demo pipeline), then a re-run."""
    out = tmp_path / "out"
    argv = [
        "transfer-demo",
        "--store",
        str(bit_store),
        "--out",
        str(out),
        "--all-data",
        str(tmp_path / "none"),
    ]
    argv += ["--encoder-epochs", "1", "--bit-epochs", "1", "--transfer-encoder-epochs", "1"]
    argv += ["--transfer-epochs", "1", "--scratch-epochs", "1", "--clusters", "4", "--n-external", "16"]
    argv += ["--val-fraction", "0.3", "--recon-images", "2", "--dip-steps", "2", "--base-external-ratio", "1"]
    assert main(argv) == 0
    report = out / "report"
    for name in ("summary.json", "metrics.md", "metrics.json", "reconstructions.png", "clusters.png"):
        assert (report / name).is_file(), name
    summary = json.loads((report / "summary.json").read_text())
    assert 0 < summary["noise_ceiling"] < 1
    t = summary["transfer"]
    assert t["hours"] == 1.0 and t["subject"] == 2 and t["base_subjects"] == [1]
    for name in VARIANTS:
        for key in ("semantic_val_cos", "semantic_val_2way", "lowlevel_val_2way"):
            assert math.isfinite(t[name][key]), (name, key)
        for stage in ("low_level", "semantic"):
            assert math.isfinite(t[name]["recon"][stage]["pixcorr"]), (name, stage)
            assert math.isfinite(t[name]["recon"][stage]["alexnet2"]), (name, stage)
    assert math.isfinite(t["ratios"]["transfer/scratch"]["semantic_val_2way"])
    assert {"ari_functional", "ari_subject_nearest_neighbour"} <= set(summary["v2c"])
    timings = summary["timings_s"]
    assert {"base encoder", "transfer", "scratch lowlevel BIT", "all_data reconstruct"} <= set(timings)
    with capsys.disabled():  # the tiny store's seconds per step, for the record
        print("\nseconds per step:", json.dumps(timings, indent=1))
    # The re-run skips every step: nothing is retrained, the report is the same.
    checkpoint = out / "transfer" / "lowlevel" / "lowlevel.ckpt"
    mtime = checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    steps = [line for line in printed.splitlines() if line.startswith("[") and "]" in line]
    assert steps and all("] done (" in line for line in steps), steps
    assert "$ brainit-pl" not in printed
    assert checkpoint.stat().st_mtime_ns == mtime
    again = json.loads((report / "summary.json").read_text())
    assert again["transfer"] == t and again["timings_s"] == timings
