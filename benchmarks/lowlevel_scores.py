"""Low-level feature prediction, scored several ways, for BITModule checkpoints on a store's val split.

For each checkpoint: two-way identification of the 240 fixed evaluation positions' tokens by Pearson r on
the flattened tokens (``val/vgg_2way``), the same after centring each position over the images, by the sum of
dot products (what the InfoNCE logits score), by the mean token cosine, and the share of the predictions'
energy that is the same for every image ("common", ‖mean over images‖² / mean ‖p‖²; the true tokens' too).

usage:
  python benchmarks/lowlevel_scores.py --store demo/store bit=BIT.ckpt mindeye2=ME2.ckpt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.lit.bit import BITModule
from brainit_pl.metrics.identification import two_way_from_scores, two_way_identification


def collect(path: str, dm: NSDDataModule, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, D) predicted and true tokens at the evaluation positions of every val image."""
    module = BITModule.load_from_checkpoint(path, map_location=device).eval()
    preds, targets = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            positions = module.eval_positions.expand(len(batch["betas"]), -1)
            preds.append(
                module(batch["betas"].to(device), batch["voxel_ids"].to(device), positions).float().cpu()
            )
            tokens = module.vgg_tokens(batch["image_112"].to(device)).float()  # (B, 7190, D): the true tokens
            targets.append(tokens[:, module.eval_positions].cpu())
    return torch.cat(preds), torch.cat(targets)


def scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    centred_p, centred_t = pred - pred.mean(0), target - target.mean(0)
    # (N target, N pred) similarity matrices, as two_way_from_scores reads them
    cosines = torch.einsum("ipd,jpd->ij", F.normalize(target, dim=-1), F.normalize(pred, dim=-1))
    return {
        "pearson": two_way_identification(target.flatten(1), pred.flatten(1)).item(),
        "centred": two_way_identification(centred_t.flatten(1), centred_p.flatten(1)).item(),
        "dot": two_way_from_scores(torch.einsum("ipd,jpd->ij", target, pred)).item(),
        "token_cosine": two_way_from_scores(cosines).item(),
        "common": (pred.mean(0).square().sum() / pred.square().sum(dim=(1, 2)).mean()).item(),
        "common_true": (target.mean(0).square().sum() / target.square().sum(dim=(1, 2)).mean()).item(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as in the configs [0.1]")
    parser.add_argument("checkpoints", nargs="+", help="NAME=PATH")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dm = NSDDataModule(store=args.store, voxels_per_sample=None, image_sizes=[112],
                       val_fraction=args.val_fraction, batch_size=32)  # fmt: skip
    dm.setup("fit")
    for name, path in (item.split("=", 1) for item in args.checkpoints):
        s = scores(*collect(path, dm, device))
        print(f"{name}: " + " ".join(f"{k} {v:.3f}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
