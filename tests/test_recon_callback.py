"""ReconstructionCallback on a low-level BIT run: validation previews in TensorBoard, test reconstructions."""

import json
from pathlib import Path

from brainit_pl.cli import main
from test_bit_lit import LOWLEVEL, _args, _scalars


def _callbacks(path: Path, semantic: Path) -> str:
    path.write_text(
        f"""trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/loss, mode: min, save_last: true}}
    - class_path: brainit_pl.recon.callback.ReconstructionCallback
      init_args:
        every_n_epochs: 1
        n_images: 3
        other: {semantic}
        tiny_unclip: true
        dip_steps: 2
        test_dip_steps: 2
        dip_channels: 16
        nets: tiny
"""
    )
    return str(path)


def test_previews_and_test_reconstructions(bit_store, checkpoints, tmp_path):
    """A low-level BIT run with a stage-1 semantic BIT as ``other``: the ablation stage ``semantic_stock``."""
    semantic = checkpoints.semantic
    extra = (
        "--config",
        _callbacks(tmp_path / "cb.yaml", semantic),
        *LOWLEVEL,
        "--data.image_sizes",
        "[112,224]",
    )
    short = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert main(_args(bit_store, tmp_path / "fit", *extra, *short)) == 0
    logged = _scalars(tmp_path / "fit")
    for stage in ("lowlevel", "semantic_stock"):
        assert (
            -1 <= logged[f"val/recon_{stage}_pixcorr"][0] <= 1 and len(logged[f"val/recon_{stage}_ssim"]) == 1
        )

    ckpt = next((tmp_path / "fit").rglob("last.ckpt"))
    test = ("--ckpt_path", str(ckpt), "--data.test_average_repeats", "true")
    assert main(_args(bit_store, tmp_path / "test", *extra, *test, command="test")) == 0
    (out,) = (tmp_path / "test").rglob("reconstruct")
    for stage in ("lowlevel", "semantic_stock"):
        assert len(list((out / "subj01" / stage).glob("*.png"))) == 10  # the tiny preset's shared images
        results = json.loads((out / f"metrics_{stage}" / "metrics.json").read_text())
        assert set(results["per_subject"]) == {"subj01", "subj02"}
    assert "test_lowlevel/pixcorr" in _scalars(tmp_path / "test")


def test_previews_of_a_run_without_224_images_use_the_upsampled_stimuli():
    import torch

    from brainit_pl.recon.callback import _ground_truth

    small = torch.rand(2, 3, 112, 112)
    assert _ground_truth({"image_112": small, "betas": torch.zeros(2, 4)}).shape == (2, 3, 224, 224)
    big = torch.rand(2, 3, 224, 224)
    assert torch.equal(_ground_truth({"image_112": small, "image_224": big}), big)


def test_previews_only_callback_leaves_test_alone():
    """The training configs' callback (``test: false``): `brainit-pl test` of them scores features only."""
    from brainit_pl.recon.callback import ReconstructionCallback

    callback = ReconstructionCallback(test=False)
    for hook in (callback.on_test_start, callback.on_test_epoch_end):
        assert hook(None, None) is None  # returns before touching the trainer or building a chain
    assert callback.on_test_batch_end(None, None, None, {}, 0) is None and callback._chain is None
