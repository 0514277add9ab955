"""`brainit-pl evaluate` end to end on tiny PNG folders, its reports, and its one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainit_pl.cli import main
from brainit_pl.metrics import METRIC_NAMES, log_to_tensorboard, make_results, write_reports
from brainit_pl.metrics.folders import discover, load_embeddings
from brainit_pl.metrics.protocols import UNVERSIONED
from brainit_pl.metrics.report import comparability, read_results, render_markdown
from brainit_pl.metrics.suite import PER_IMAGE_METRICS

N = 7


def _save(folder: Path, images: np.ndarray, names: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / (names[i] if names else f"{i:04d}.png"))


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """gt/ (7 PNGs, 40x36), recons/subj01/*.png (noisy copies, 48x48), recons/subj02/{refined,semantic}/."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (N, 36, 40, 3), dtype=np.uint8)
    _save(tmp_path / "gt", gt)
    noisy = np.clip(gt.astype(int) + rng.integers(-40, 40, gt.shape), 0, 255).astype(np.uint8)
    _save(
        tmp_path / "recons" / "subj01",
        np.stack([np.asarray(Image.fromarray(a).resize((48, 48))) for a in noisy]),
    )
    _save(tmp_path / "recons" / "subj02" / "refined", rng.integers(0, 256, (N, 48, 48, 3), dtype=np.uint8))
    _save(tmp_path / "recons" / "subj02" / "semantic", gt)
    return {"root": tmp_path, "gt": tmp_path / "gt", "recons": tmp_path / "recons", "out": tmp_path / "out"}


def _evaluate(tree: dict[str, Path], *extra: str, recons: Path | None = None) -> int:
    argv = [
        "evaluate",
        "--recons",
        str(recons or tree["recons"]),
        "--gt",
        str(tree["gt"]),
        "--out",
        str(tree["out"]),
    ]
    return main([*argv, "--nets", "tiny", "--device", "cpu", "--batch-size", "3", *extra])


def test_evaluate_writes_a_self_contained_report_html(tree, read_report):
    assert _evaluate(tree, "--n-boot", "20") == 0
    text, n_images, n_tables = read_report(tree["out"] / "report.html")
    assert n_images == 2 * N * 2  # per subject: each image's ground truth beside its reconstruction
    assert n_tables == 3 and "subj01" in text and "subj02" in text and "bootstrap intervals" in text
    assert text.count("<small>[") >= 2 * 3  # intervals, e.g. PixCorr / SSIM of both subjects and the mean


def test_evaluate_per_subject_writes_the_three_tables(tree):
    assert _evaluate(tree) == 0
    results = json.loads((tree["out"] / "metrics.json").read_text())
    assert list(results) == [
        "protocol", "protocol_version", "protocol_options", "n_images", "per_subject", "mean", "ci", "ci_method",
        "mean_ci",
    ]  # fmt: skip
    assert results["protocol"] == "mindeye2" and results["n_images"] == N
    assert results["protocol_version"] == "2"
    options = results["protocol_options"]
    assert options["antialias"] is False and options["ssim"] == "2d" and options["retrieval_seed"] == 42
    assert results["ci_method"] == {
        "kind": "percentile bootstrap over images", "n_boot": 1000, "level": 0.95, "seed": 0,
    }  # fmt: skip
    for name in PER_IMAGE_METRICS:  # the mean over subjects: a subject-stratified interval
        low, high = results["mean_ci"][f"{name}_ci"]
        assert low <= results["mean"][name] <= high, name
    per_image = (tree["out"] / "per_image.csv").read_text().splitlines()
    assert per_image[0].startswith("subject,image,") and len(per_image) == 1 + N * len(results["per_subject"])
    for subject, bounds in results["ci"].items():
        assert list(bounds) == [f"{n}_ci" for n in PER_IMAGE_METRICS]  # no interval for retrieval
        for name in PER_IMAGE_METRICS:
            low, high = bounds[f"{name}_ci"]
            assert low <= results["per_subject"][subject][name] <= high
    assert list(results["per_subject"]) == ["subj01", "subj02"]
    for row in [*results["per_subject"].values(), results["mean"]]:
        assert list(row) == list(METRIC_NAMES)
        assert row["retrieval_image"] is None and row["retrieval_brain"] is None  # no embeddings.npz
        assert all(0.0 <= row[name] <= 1.0 for name in ("alexnet2", "alexnet5", "inception", "clip"))
    subj01, subj02 = results["per_subject"]["subj01"], results["per_subject"]["subj02"]
    assert subj01["pixcorr"] > 0.8 > abs(subj02["pixcorr"])  # subj02 is scored on its refined (random) images
    assert results["mean"]["ssim"] == pytest.approx((subj01["ssim"] + subj02["ssim"]) / 2)

    markdown = (tree["out"] / "metrics.md").read_text()
    assert "`mindeye2`" in markdown and "Test images: 7" in markdown and "| subj01 | 7 |" in markdown
    assert "**mean**" in markdown and "—" in markdown and "NOT comparable" in markdown
    assert (
        "| Brain-IT, 40 h | 0.386 | 0.486 | 98.4% |" in markdown and "| MindEye2, 1 h | 0.195 |" in markdown
    )

    rows = list(csv.DictReader((tree["out"] / "metrics.csv").open()))
    assert [r["row"] for r in rows] == ["subj01", "subj02", "mean", "MindEye2, 40 h", "Brain-IT, 40 h",
                                        "MindEye2, 1 h", "Brain-IT, 1 h"]  # fmt: skip
    assert float(rows[0]["pixcorr"]) == pytest.approx(subj01["pixcorr"]) and rows[0]["retrieval_image"] == ""
    assert {r["source"] for r in rows[3:]} == {"published"}


def test_evaluate_flat_folder_braindiffuser(tree):
    flat = tree["recons"] / "subj02" / "semantic"  # identical to the ground truth
    assert _evaluate(tree, "--protocol", "braindiffuser", recons=flat) == 0
    results = json.loads((tree["out"] / "metrics.json").read_text())
    assert results["protocol"] == "braindiffuser" and list(results["per_subject"]) == ["all"]
    assert results["protocol_options"]["ssim"] == "columns"
    assert results["protocol_options"]["net_weights"] == {"effnet": "efficientnet-b1-v1"}
    row = results["per_subject"]["all"]
    assert row["pixcorr"] == pytest.approx(1.0) and row["ssim"] == pytest.approx(1.0)
    assert row["alexnet2"] == 1.0 and row["effnet"] == pytest.approx(0.0, abs=1e-9)
    assert row == results["mean"]
    rows = list(csv.DictReader((tree["out"] / "metrics.csv").open()))
    assert [r["row"] for r in rows] == ["all", "mean"]  # published rows are MindEye2-protocol numbers
    assert "not comparable with the `braindiffuser` table" in (tree["out"] / "metrics.md").read_text()


def test_kind_selection(tree):
    sets = {s.subject: s for s in discover(tree["recons"], tree["gt"])}
    assert sets["subj01"].recon_dir == tree["recons"] / "subj01"
    assert sets["subj02"].recon_dir == tree["recons"] / "subj02" / "refined"  # the default kind
    (tree["recons"] / "subj01" / "semantic").mkdir()
    _save(tree["recons"] / "subj01" / "semantic", np.zeros((N, 8, 8, 3), dtype=np.uint8))
    sets = discover(tree["recons"], tree["gt"], kind="semantic")
    assert [s.recon_dir.name for s in sets] == ["semantic", "semantic"]


def _expect_one_line_error(capsys, tree, match: str, *extra: str, recons: Path | None = None) -> None:
    assert _evaluate(tree, *extra, recons=recons) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brainit-pl evaluate: error: ") and "\n" not in err and "Traceback" not in err
    assert match in err, err
    assert not (tree["out"] / "metrics.json").exists()


def test_mismatched_file_names(tree, capsys):
    (tree["recons"] / "subj01" / "0003.png").rename(tree["recons"] / "subj01" / "extra.png")
    _expect_one_line_error(capsys, tree, "extra.png has no ground truth of the same name")


def test_missing_reconstruction(tree, capsys):
    (tree["recons"] / "subj01" / "0003.png").unlink()
    _expect_one_line_error(capsys, tree, "0003.png has no reconstruction of the same name")


def test_mixed_image_sizes(tree, capsys):
    Image.new("RGB", (20, 20)).save(tree["recons"] / "subj01" / "0004.png")
    _expect_one_line_error(capsys, tree, "0004.png is 20x20 but 0000.png is 48x48")


def test_missing_weight_file(tree, capsys):
    argv = ["evaluate", "--recons", str(tree["recons"]), "--gt", str(tree["gt"]), "--out", str(tree["out"])]
    assert main([*argv, "--nets", "real", "--weights-dir", str(tree["root"] / "weights")]) == 2
    err = capsys.readouterr().err.strip()
    assert "alexnet-owt-7be5be79.pth" in err and str(tree["root"] / "weights") in err and "\n" not in err


def test_too_few_items_for_retrieval(tree, capsys):
    np.savez(tree["recons"] / "subj01" / "embeddings.npz", brain=np.zeros((N, 4)), image=np.zeros((N, 4)))
    _expect_one_line_error(capsys, tree, "retrieval needs at least 300 test items")


def test_unknown_kind_folder_and_missing_folder(tree, capsys):
    _expect_one_line_error(capsys, tree, "there is no folder", "--kind", "lowlevel")
    _expect_one_line_error(capsys, tree, "is not a folder", recons=tree["root"] / "nowhere")


def test_embeddings_follow_their_names_order(tmp_path):
    names = tuple(f"{i:04d}.png" for i in range(300))
    order = list(reversed(names))
    brain = np.arange(300, dtype=np.float32)[::-1, None] * np.ones((1, 2), np.float32)  # row k <-> order[k]
    np.savez(tmp_path / "embeddings.npz", brain=brain, image=brain + 1, names=np.array(order))
    b, i = load_embeddings(tmp_path / "embeddings.npz", names)
    assert b[:, 0].tolist() == list(range(300)) and (i - b).eq(1).all()


def test_report_mean_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    row = dict.fromkeys(METRIC_NAMES, 0.5)
    results = make_results(
        "mindeye2", {"subj01": row, "subj02": {**row, "retrieval_image": None, "ssim": 0.7}}, 12
    )
    assert results["mean"]["ssim"] == pytest.approx(0.6) and results["mean"]["retrieval_image"] is None
    paths = write_reports(tmp_path / "out", results)
    assert json.loads(paths["metrics.json"].read_text()) == results
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_to_tensorboard(writer, results, prefix="test", step=3)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test/pixcorr", "test/clip_2way", "test/swav", "test/subj02/ssim", "test/retrieval_brain"} <= tags
    assert "test/retrieval_image" not in tags  # absent metrics are not logged
    assert (
        events.Scalars("test/ssim")[0].value == pytest.approx(0.6)
        and events.Scalars("test/ssim")[0].step == 3
    )


def test_antialias_option_and_no_bootstrap(tree):
    assert _evaluate(tree, "--antialias", "--n-boot", "0") == 0
    results = json.loads((tree["out"] / "metrics.json").read_text())
    assert results["protocol_options"]["antialias"] is True and "ci" not in results


def test_antialias_is_refused_for_braindiffuser(tree, capsys):
    assert _evaluate(tree, "--protocol", "braindiffuser", "--antialias") == 2
    assert "mindeye2 protocol only" in capsys.readouterr().err


def test_an_old_metrics_json_is_labelled_unversioned(tmp_path):
    row = dict.fromkeys(METRIC_NAMES, 0.5)
    old = {"protocol": "mindeye2", "n_images": 1000, "per_subject": {"subj01": row}, "mean": row}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(old))
    read = read_results(path)
    assert read["protocol_version"] == UNVERSIONED and read["protocol_options"] is None
    assert f"Protocol version: {UNVERSIONED}" in render_markdown(old)
    new = make_results("mindeye2", {"subj01": row}, 1000)
    assert any("versions differ" in reason for reason in comparability(old, new))
    assert comparability(new, make_results("mindeye2", {"subj01": row}, 1000)) == []
    assert any(
        "protocols differ" in r for r in comparability(new, make_results("braindiffuser", {"all": row}, 1000))
    )
