"""Why the low-level images are where they are: the DIP from true, noisy, predicted and mean VGG tokens.

For shared test images of every subject of a store (held out from training) and as many training images,
with one low-level BIT checkpoint, the DIP (:func:`brainit_pl.recon.dip.invert_vgg_tokens`) inverts:

* ``truth``       the true VGG tokens of the image (the ceiling of the low-level stage);
* ``truth+noise`` the true tokens plus Gaussian noise of the predictions' error size, per scale;
* ``pred``        the BIT's predictions (held-out images: what ``reconstruct`` does);
* ``pred_train``  the BIT's predictions of *training* images (is it the generalisation?);
* ``calibrated``  the held-out predictions mapped into token space by a per-scale affine map fitted on the
                  training images (p ↦ a_s·p + b_pos; an option outside the method, to measure);
* ``mean``        the mean true tokens of the training images, the same for every image (the prior alone).

Each result is scored against its ground truth (224², PixCorr and SSIM of ``brainit_pl.metrics``, per image,
with a 95 % bootstrap interval over images); the linear pixel baseline's PixCorr on the same images is the
bar. It also prints the per-scale agreement of predicted and true tokens (Pearson r over images and
positions, after removing the mean over images; norm ratio; share of the energy common to all images).

usage:
  python benchmarks/lowlevel_dip_study.py --store demo/store --lowlevel runs/demo/lowlevel/bit/fit/.../best.ckpt \
      [--linear runs/demo/linear/fit/.../best.ckpt] [--images 4] [--steps 100] [--channels 16] \
      [--out benchmarks/results/lowlevel_dip.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.lit.bit import BITModule
from brainit_pl.metrics.bootstrap import bootstrap_ci
from brainit_pl.metrics.image import SSIM, PixCorr
from brainit_pl.recon.dip import SkipConfig, invert_vgg_tokens


def batches(dm: NSDDataModule, split: str, per_subject: int) -> dict[str, torch.Tensor]:
    """The first ``per_subject`` images of each subject in ``split`` (betas, voxel ids, images)."""
    loader = dm.make_dataloader(split)  # all voxels (voxels_per_sample None), repeats averaged
    taken: dict[int, int] = {}
    parts: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        subject = int(batch["subject"][0])
        n = min(per_subject - taken.get(subject, 0), len(batch["nsd_id"]))
        if n > 0:
            parts.append({k: v[:n] for k, v in batch.items()})
            taken[subject] = taken.get(subject, 0) + n
    return parts


@torch.no_grad()
def predict(module: BITModule, parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted tokens, true tokens, 224² images) of the parts, concatenated."""
    preds, truths, images = [], [], []
    for p in parts:
        preds.append(module(p["betas"], p["voxel_ids"]).float())
        truths.append(module.vgg_tokens(p["image_112"]).float())
        images.append(p["image_224"].float())
    return torch.cat(preds), torch.cat(truths), torch.cat(images)


def scale_stats(pred: torch.Tensor, true: torch.Tensor, counts) -> list[dict[str, float]]:
    rows = []
    for p, t in zip(torch.split(pred, counts, 1), torch.split(true, counts, 1)):
        pc, tc = p - p.mean(0), t - t.mean(0)
        r = (pc * tc).sum() / (pc.norm() * tc.norm()).clamp_min(1e-12)
        rows.append(
            {
                "r_centred": float(r),
                "norm_ratio": float(p.norm() / t.norm().clamp_min(1e-12)),
                "common_pred": float(p.mean(0).square().sum() / p.square().sum(dim=(1, 2)).mean()),
                "common_true": float(t.mean(0).square().sum() / t.square().sum(dim=(1, 2)).mean()),
                "error_rms": float((p - t).square().mean().sqrt()),
            }
        )
    return rows


def calibrate(pred_train, true_train, counts):
    """Per scale s and position: true ≈ a_s · pred + b_pos (least squares on the training images)."""
    a, b = [], []
    for p, t in zip(torch.split(pred_train, counts, 1), torch.split(true_train, counts, 1)):
        pc, tc = p - p.mean(0), t - t.mean(0)
        scale = (pc * tc).sum() / pc.square().sum().clamp_min(1e-12)
        a.append(scale)
        b.append(t.mean(0) - scale * p.mean(0))  # (T_s, D)
    return lambda p: torch.cat([s * q + o for s, q, o in zip(a, torch.split(p, counts, 1), b)], 1)


def score(images: torch.Tensor, gt: torch.Tensor) -> dict[str, object]:
    out = {}
    for name, metric in (("pixcorr", PixCorr()), ("ssim", SSIM())):
        metric.update(recons=images, gt=gt)
        values = metric.per_image()
        out[name] = float(values.mean())
        out[f"{name}_ci"] = list(bootstrap_ci(values))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--lowlevel", required=True, help="low-level BITModule checkpoint")
    parser.add_argument("--linear", help="LinearDecoder checkpoint: its PixCorr on the same test images")
    parser.add_argument("--images", type=int, default=4, help="images per subject and split [4]")
    parser.add_argument(
        "--steps", type=int, default=100, help="DIP steps [100, the demo's; the method: 1800]"
    )
    parser.add_argument(
        "--channels", type=int, default=16, help="DIP width [16, the demo's; the method: 128]"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="DIP Adam learning rate [1e-3, the method's]")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=["truth", "truth+noise", "pred", "pred_train", "calibrated", "mean"],
        help="which inversions to run [all]",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowlevel_dip.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    module = BITModule.load_from_checkpoint(args.lowlevel, map_location="cpu").eval()
    counts = list(module.vgg_tokens.layout.counts)
    dm = NSDDataModule(store=args.store, voxels_per_sample=None, image_sizes=[112, 224], average_repeats=True,
                       val_fraction=args.val_fraction, batch_size=16)  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    test_parts, train_parts = batches(dm, "test", args.images), batches(dm, "train", args.images)
    pred, true, gt = predict(module, test_parts)
    pred_tr, true_tr, gt_tr = predict(module, train_parts)
    stats = scale_stats(pred, true, counts)
    noise = torch.cat(
        [torch.randn_like(t) * s["error_rms"] for t, s in zip(torch.split(true, counts, 1), stats)], 1
    )
    conditions = {
        "truth": (true, gt),
        "truth+noise": (true + noise, gt),
        "pred": (pred, gt),
        "pred_train": (pred_tr, gt_tr),
        "calibrated": (calibrate(pred_tr, true_tr, counts)(pred), gt),
        "mean": (true_tr.mean(0, keepdim=True).expand_as(true), gt),
    }
    results: dict[str, object] = {
        "store": args.store,
        "checkpoint": args.lowlevel,
        "images": len(gt),
        "dip": {"steps": args.steps, "channels": args.channels, "lr": args.lr},
        "scales": stats,
        "conditions": {},
    }
    if args.linear:
        from brainit_pl.lit.baseline import LinearDecoder

        linear = LinearDecoder.load_from_checkpoint(args.linear, map_location="cpu").eval()
        with torch.no_grad():
            images = torch.cat([linear(p["betas"], p["voxel_ids"]) for p in test_parts])
        results["conditions"]["linear_baseline"] = score(F.interpolate(images, size=224, mode="bilinear"), gt)
    for name, (tokens, target) in ((k, conditions[k]) for k in args.conditions):
        start = time.perf_counter()
        images = invert_vgg_tokens(tokens, module.vgg_tokens, steps=args.steps, batch=8, lr=args.lr,
                                   net=SkipConfig(channels=args.channels), progress=False)  # fmt: skip
        results["conditions"][name] = {
            **score(images, target),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(name, json.dumps(results["conditions"][name]), flush=True)
    print("per scale:", json.dumps(stats, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
