"""Universal Brain Encoder: training throughput, peak memory, and held-out accuracy against a ridge encoder.

Trains :class:`~brainit_pl.lit.encoder.EncoderModule` on a prepared store (default: the simulated demo
store that ``make demo`` writes) for --epochs, timing only the training batches (samples/s), and reports
the peak RSS of this process (and the peak GPU memory when it ran on a GPU). Then both encoders predict
every voxel of the held-out **test** images (the shared images, which no training stage sees):

* the trained encoder;
* ridge regression (``sklearn.linear_model.RidgeCV``, one penalty per voxel by efficient leave-one-out)
  from the *same frozen backbone's* features — the tapped layers' tokens averaged over tokens, (L·D) per
  image, standardised — fitted per subject on the training images with all voxels.

Both are scored by the per-voxel Pearson r over the test images (median and 75th percentile over all
voxels of all subjects), and by the median r²/noise-ceiling when the store has ncsnr.

The default backbone is the tiny random DINOv2 twin (no weights needed): its features are random
projections of the image, so the comparison says how well each head uses *those* features. With
``--weights FILE`` (or the file in $BRAINIT_WEIGHTS) and ``--real`` it uses DINOv2 ViT-L/14-reg.

usage:
  python benchmarks/encoder.py --store demo/store --epochs 5
  python benchmarks/encoder.py --store tiny/store --epochs 3 --voxels-per-sample 128
  python benchmarks/encoder.py --store data/store --real --epochs 1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import torch
from lightning import Callback, Trainer

from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.lit.encoder import EncoderModule
from brainit_pl.lit.encoder_ridge import ridge_vs_encoder


class TrainTimer(Callback):
    """Wall time and samples of the training batches only (no validation, no data loading stalls at start)."""

    def __init__(self) -> None:
        self.seconds, self.samples, self._t0 = 0.0, 0, 0.0

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        self.seconds += time.perf_counter() - self._t0
        self.samples += len(batch["betas"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="demo/store")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--voxels-per-sample", type=int, default=500)
    parser.add_argument("--real", action="store_true", help="DINOv2 ViT-L/14-reg instead of the tiny twin")
    parser.add_argument("--weights", default=None, help="DINOv2 weight file (with --real)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    gpu = torch.cuda.is_available()
    common = dict(store=args.store, image_sizes=[224], val_fraction=0.1, num_workers=args.num_workers)
    dm = NSDDataModule(**common, voxels_per_sample=args.voxels_per_sample, batch_size=args.batch_size)
    module = EncoderModule(
        dm.n_voxels,
        tiny=not args.real,
        weights=args.weights,
        token_dim=128 if args.real else 32,
        voxel_chunk=4096 if args.real else 1024,
        lr=args.lr,
    )
    timer = TrainTimer()
    trainer = Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - start
    ncsnr = module.ncsnr

    dm_all = NSDDataModule(**common, voxels_per_sample=None, batch_size=args.batch_size)
    start = time.perf_counter()
    scores = ridge_vs_encoder(module, dm_all, ncsnr)
    eval_s = time.perf_counter() - start

    report = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "threads": torch.get_num_threads(),
        "backbone": "dinov2_vitl14_reg" if args.real else "tiny twin (random)",
        "store": args.store,
        "subjects": dm.n_voxels,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "voxels_per_sample": args.voxels_per_sample,
        "train_samples_per_s": round(timer.samples / max(timer.seconds, 1e-9), 2),
        "fit_seconds": round(fit_s, 1),
        "eval_seconds": round(eval_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None,
        "test": {k: {m: round(v, 4) for m, v in s.items()} for k, s in scores.items()},
    }
    print(json.dumps(report, indent=2))
    enc, ridge = scores["encoder"], scores["ridge"]
    print(
        f"held-out (test split) voxel r: encoder median {enc['voxel_corr_median']:.3f} / "
        f"p75 {enc['voxel_corr_p75']:.3f}; ridge median {ridge['voxel_corr_median']:.3f} / "
        f"p75 {ridge['voxel_corr_p75']:.3f}"
    )


if __name__ == "__main__":
    main()
