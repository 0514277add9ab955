"""`brainit-pl transfer`: base models of subject 1 (tiny store) transferred to subject 2 from 1 h of data.

The base models are trained once per module through the real CLI; the transfer runs once, end to end, through
``brainit_pl.cli.main``; the tests then check its outputs: what moved (only subject 2's rows, bit for bit), the
nearest-neighbour init and clusters, the checkpoints loading on their own, the skip on re-run, and the
one-line refusals of bad input.
"""

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from brainit_pl.cli import main
from brainit_pl.errors import BrainITError
from brainit_pl.lit.bit import BITModule
from brainit_pl.lit.encoder import EncoderModule
from brainit_pl.models.encoder import VoxelRows, grow_voxel_table, move_voxel_ids, voxel_offsets
from brainit_pl.models.v2c import load_clusters

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

CONFIGS = Path(__file__).parents[1] / "configs"
BASE = {1: 367}  # the tiny store's subject 1: the base models' voxel table
TABLE = {1: 367, 2: 356}  # after adding subject 2
ONE = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--data.subjects", "[1]")
LOWLEVEL = (
    *("--model.init_args.branch", "lowlevel", "--model.init_args.tiny_vgg", "true"),
    *("--model.init_args.target_shape", "null", "--model.init_args.tokens_per_scale", "[8,8,4,4,2]"),
    *("--data.features", "[]", "--data.image_sizes", "[112]"),
)


def _fit(config: str, store: Path, root: Path, *extra: str) -> Path:
    args = ["fit", "--config", str(CONFIGS / config), "--data.store", str(store)]
    assert main([*args, "--trainer.default_root_dir", str(root), *ONE, *extra]) == 0
    (path,) = root.rglob("last.ckpt")
    return path


@pytest.fixture(scope="module")
def base(bit_store, tmp_path_factory):
    """Base models of subject 1 only: encoder → functional clusters → both BITs → stage 2 (1 short epoch each)."""
    root = tmp_path_factory.mktemp("base")
    encoder = _fit("encoder_tiny.yaml", bit_store, root / "encoder", "--trainer.logger", "false")
    argv = ["cluster", "--embeddings", str(encoder), "--store", str(bit_store), "--out", str(root / "v2c")]
    assert main([*argv, "--clusters", "4", "--covariance", "diag", "--no-plots"]) == 0
    clusters = root / "v2c" / "clusters.npz"
    bit = ("--model.init_args.clusters", str(clusters))
    semantic = _fit("sim/bit_tiny.yaml", bit_store, root / "semantic", *bit)
    lowlevel = _fit("sim/bit_tiny.yaml", bit_store, root / "lowlevel", *bit, *LOWLEVEL)
    stage2 = _fit(
        "sim/stage2_tiny.yaml", bit_store, root / "stage2", "--model.init_args.bit_checkpoint", str(semantic)
    )
    return {
        "encoder": encoder,
        "clusters": clusters,
        "semantic": semantic,
        "lowlevel": lowlevel,
        "stage2": stage2,
    }


def _argv(store, base, out, *extra):
    return [
        "transfer",
        *("--store", str(store), "--subject", "2", "--hours", "1", "--out", str(out)),
        *("--encoder", str(base["encoder"]), "--clusters", str(base["clusters"])),
        *("--semantic", str(base["semantic"]), "--lowlevel", str(base["lowlevel"])),
        *("--external-images", "6", "--val-fraction", "0.3", "--device", "cpu"),
        *("--epochs-encoder", "1", "--epochs-bit", "1", "--epochs-stage2", "1"),
        *("--stage2-warmup-steps", "0", "--stage2-accumulate", "1"),  # CPU settings: the authors' are 1000, 8
        *("--tiny-unclip", "--nets", "tiny", "--dip-steps", "2", "--dip-channels", "8", "--limit", "2"),
        *extra,
    ]


@pytest.fixture(scope="module")
def transferred(bit_store, base, tmp_path_factory):
    """One transfer run, end to end through the CLI, from the base stage-2 model."""
    out = tmp_path_factory.mktemp("transfer") / "out"
    assert main(_argv(bit_store, base, out, "--stage2", str(base["stage2"]))) == 0
    return out


def _state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _rows(table: torch.Tensor, n_voxels: dict[int, int], subject: int) -> torch.Tensor:
    start = voxel_offsets(n_voxels)[subject]
    return table[start : start + n_voxels[subject]]


# ------------------------------------------------------------------------------------------ end to end
def test_outputs_summary_and_standalone_checkpoints(transferred):
    summary = json.loads((transferred / "summary.json").read_text())
    assert summary["subject"] == 2 and summary["base_subjects"] == [1] and summary["n_voxels"] == 356
    for key in ("semantic_val_cos", "semantic_val_2way", "lowlevel_val_2way", "stage2_val_loss"):
        assert np.isfinite(summary[key]), key
    assert -1 <= summary["semantic_val_cos"] <= 1 and 0 <= summary["lowlevel_val_2way"] <= 1
    assert set(summary["timings_s"]) == {
        "encoder",
        "v2c",
        "synthetic",
        "semantic",
        "lowlevel",
        "stage2",
        "reconstruct",
    }
    assert set(summary["recon"]) == {"lowlevel", "semantic"}
    assert -1 <= summary["recon"]["semantic"]["pixcorr"] <= 1
    for step in ("encoder", "semantic", "lowlevel", "stage2"):
        assert list((transferred / step / "tb").glob("events.out.tfevents.*")), step
    # reconstructions of subject 2 only, with the transferred stage-2 model (its BIT and the base UNet)
    assert len(list((transferred / "reconstruct" / "subj02" / "semantic").glob("*.png"))) == 2
    assert not (transferred / "reconstruct" / "subj01").exists()
    run = json.loads((transferred / "reconstruct" / "run.json").read_text())
    assert run["stage2"]["path"].endswith("stage2/stage2.ckpt") and run["semantic_stock"] is None
    assert run["finished"]
    # every checkpoint loads on its own, with the larger voxel table
    encoder = EncoderModule.load_from_checkpoint(transferred / "encoder" / "encoder.ckpt", map_location="cpu")
    assert encoder.encoder.n_voxels == TABLE and encoder.hparams.voxel_subjects == [2]
    for path in ("semantic/semantic.ckpt", "lowlevel/lowlevel.ckpt", "stage2/semantic.ckpt"):
        bit = BITModule.load_from_checkpoint(transferred / path, map_location="cpu")
        assert bit.n_voxels == TABLE and bit.hparams.clusters == str(transferred / "v2c" / "clusters.npz")
    # the synthetic fMRI was made by the transferred encoder, for subject 2 among others
    assert (transferred / "synthetic" / "fmri_subj02.h5").is_file()
    assert (transferred / "synthetic" / "features_clip.h5").is_file()


def test_only_the_new_subjects_rows_move(transferred, base):
    enc_base, enc = _state(base["encoder"]), _state(transferred / "encoder" / "encoder.ckpt")
    for key, value in enc_base.items():
        if key.endswith("voxel_embed") or key.endswith("voxel_embed.weight"):
            assert torch.equal(_rows(enc[key], TABLE, 1), value), key  # base rows: bit for bit
        else:
            assert torch.equal(enc[key], value), key
    assert set(enc) == set(enc_base)
    lightning.seed_everything(0, verbose=False)  # as the step did (--seed 0) before adding the rows
    init = EncoderModule.transfer_from(base["encoder"], {2: 356}).encoder.voxel_embed.weight.detach()
    moved = _rows(enc["encoder.voxel_embed.weight"], TABLE, 2) - _rows(init, TABLE, 2)
    assert 0 < moved.abs().max() < 0.01  # trained: a few Adam steps of lr 1e-3 from the seeded init
    with np.load(transferred / "v2c" / "neighbours.npz") as f:
        target, source = torch.from_numpy(f["target_ids"]), torch.from_numpy(f["source_ids"])
    for branch in ("semantic", "lowlevel"):
        before, after = _state(base[branch]), _state(transferred / branch / f"{branch}.ckpt")
        assert set(after) == set(before)
        for key, value in before.items():
            if key != "net.voxel_embed":
                assert torch.equal(after[key], value), (branch, key)
        table = after["net.voxel_embed"]
        assert torch.equal(_rows(table, TABLE, 1), before["net.voxel_embed"]), branch
        start = before["net.voxel_embed"][source]  # the NN init: the neighbours' base rows
        assert not torch.equal(table[target], start)  # trained ...
        # ... from there: 7 AdamW steps of lr 5e-4 move an entry by < 3.5e-3 (the rows are ~0.01 in size)
        assert (table[target] - start).abs().max() < 0.005
    # stage 2: from the base stage-2 model, only subject 2's rows of the BIT moved
    st_base, st = _state(base["stage2"]), _state(transferred / "stage2" / "stage2.ckpt")
    for key, value in st_base.items():
        if key != "net.voxel_embed":
            assert torch.equal(st[key], value), key
    assert torch.equal(_rows(st["net.voxel_embed"], TABLE, 1), st_base["net.voxel_embed"])
    semantic = _state(transferred / "semantic" / "semantic.ckpt")["net.voxel_embed"]
    assert not torch.equal(_rows(st["net.voxel_embed"], TABLE, 2), _rows(semantic, TABLE, 2))
    exported = _state(transferred / "stage2" / "semantic.ckpt")
    assert all(torch.equal(exported[k], v) for k, v in st.items() if k.startswith("net.")) and exported


def test_clusters_are_the_base_ones_plus_nearest_neighbour_labels(transferred, base):
    clusters = load_clusters(transferred / "v2c" / "clusters.npz", TABLE)
    base_clusters = load_clusters(base["clusters"], BASE)
    np.testing.assert_array_equal(clusters.subject_labels(1), base_clusters.cluster_of_voxel)
    with np.load(transferred / "v2c" / "neighbours.npz") as f:
        target, source = f["target_ids"], f["source_ids"]
    assert target.tolist() == list(range(367, 367 + 356)) and ((source >= 0) & (source < 367)).all()
    np.testing.assert_array_equal(clusters.cluster_of_voxel[target], clusters.cluster_of_voxel[source])
    # the neighbour is the nearest base voxel by cosine of the transferred encoder's embeddings
    table = _state(transferred / "encoder" / "encoder.ckpt")["encoder.voxel_embed.weight"]
    unit = torch.nn.functional.normalize(table.double(), dim=1)
    best = (unit[target] @ unit[:367].T).argmax(1).numpy()
    np.testing.assert_array_equal(best, source)


def test_rerun_skips_finished_steps_and_refuses_other_settings(bit_store, base, transferred, stderr_lines):
    before = {p: p.stat().st_mtime_ns for p in transferred.rglob("*.ckpt")}
    assert main(_argv(bit_store, base, transferred, "--stage2", str(base["stage2"]))) == 0
    assert {p: p.stat().st_mtime_ns for p in transferred.rglob("*.ckpt")} == before
    stderr_lines()
    assert main(_argv(bit_store, base, transferred, "--stage2", str(base["stage2"]), "--init", "random")) == 2
    (line,) = stderr_lines()
    assert "semantic was made with other settings (init)" in line


# ------------------------------------------------------------------------------------------ refusals
def test_bad_input_is_one_line(bit_store, base, tmp_path, stderr_lines):
    def refused(*extra, **replace) -> str:
        paths = {**base, **replace}
        stderr_lines()
        argv = _argv(bit_store, paths, tmp_path / "out", *extra)
        assert main(argv) == 2
        (line,) = stderr_lines()
        assert not (tmp_path / "out").exists()
        return line

    line = refused("--subject", "1")
    assert "subject 1 is already in the base models' voxel table" in line
    assert "subject 7 is not in the store" in refused("--subject", "7")
    # clusters made for both subjects (the fixture's random ones), not the base models' table
    line = refused(clusters=bit_store / "clusters.npz")
    assert "were made for the voxel table {1: 367, 2: 356}" in line and "base models have {1: 367}" in line
    line = refused(semantic=base["lowlevel"])
    assert "is a lowlevel BIT checkpoint" in line
    assert "--keep best needs validation images" in refused("--val-fraction", "0", "--keep", "best")


# ------------------------------------------------------------------------------------------ units
def test_voxel_table_layout_helpers():
    counts, table = {1: 3, 5: 2}, {1: 3, 2: 4, 5: 2}
    assert voxel_offsets(table) == {1: 0, 2: 3, 5: 7}
    assert move_voxel_ids(torch.tensor([0, 2, 3, 4]), counts, table).tolist() == [0, 2, 7, 8]
    rows = torch.arange(5.0)[:, None].expand(5, 2)
    grown = grow_voxel_table(rows, counts, table, torch.full((9, 2), -1.0))
    assert grown[:, 0].tolist() == [0, 1, 2, -1, -1, -1, -1, 3, 4]
    with pytest.raises(BrainITError, match="is not part of the table"):
        grow_voxel_table(rows, {1: 3, 5: 3}, table, torch.zeros(9, 2))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_voxel_rows_keep_other_rows_bitwise_under_adamw(device):
    # AdamW with weight decay, a gradient on every row: only subject 2's rows may move.
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(9, 4, device=device))
    start = table.detach().clone()
    rows = VoxelRows({1: 3, 2: 4, 5: 2}, [2])
    optimizer = torch.optim.AdamW([VoxelRows.param_group(table, 0.5)], lr=0.1, weight_decay=0.5)
    reference = torch.nn.Parameter(start[3:7].clone())  # plain AdamW on subject 2's rows alone
    plain = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        plain.zero_grad()
        (table.square() * torch.arange(9.0, device=device)[:, None]).sum().backward()
        (reference.square() * torch.arange(3.0, 7.0, device=device)[:, None]).sum().backward()
        rows.before_step(table, optimizer)
        optimizer.step()
        plain.step()
    assert torch.equal(table[:3], start[:3]) and torch.equal(table[7:], start[7:])
    torch.testing.assert_close(table[3:7], reference, rtol=0, atol=1e-7)  # the same AdamW update


def test_nn_init_copies_the_neighbours_rows(base, tmp_path):
    from brainit_pl.models.v2c import ClusterMap, save_clusters

    labels = np.concatenate([load_clusters(base["clusters"]).cluster_of_voxel, np.zeros(356, dtype=np.int64)])
    save_clusters(tmp_path / "clusters.npz", ClusterMap(labels, TABLE, 4, "functional", 0))
    target = torch.tensor([367, 368, 722])
    source = torch.tensor([5, 0, 366])
    module = BITModule.transfer_from(base["semantic"], {2: 356}, tmp_path / "clusters.npz", (target, source))
    random = BITModule.transfer_from(base["semantic"], {2: 356}, tmp_path / "clusters.npz")
    base_table = _state(base["semantic"])["net.voxel_embed"]
    table = module.net.voxel_embed.detach()
    assert torch.equal(table[target], base_table[source]) and torch.equal(table[:367], base_table)
    assert torch.equal(random.net.voxel_embed.detach()[:367], base_table)
    assert not torch.equal(random.net.voxel_embed.detach()[target], base_table[source])
    # only the table trains, and the optimizer holds it alone, without AdamW's own decay
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["net.voxel_embed"]
    (group,) = module.configure_optimizers()["optimizer"].param_groups
    assert group["weight_decay"] == 0 and group["row_weight_decay"] == 0.01
    with pytest.raises(BrainITError, match="already in the voxel table"):
        BITModule.transfer_from(base["semantic"], {1: 367}, tmp_path / "clusters.npz")
