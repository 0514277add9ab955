"""The ridge baseline of the Universal Encoder: RidgeCV per subject on the frozen backbone's pooled features.

Used by ``benchmarks/encoder.py`` and ``brainit-pl demo`` (``summary.json``'s ``encoder.ridge_val_corr_median``):
each tapped layer's tokens averaged over tokens, (L·D) per image, standardised, one penalty per voxel by
efficient leave-one-out, fitted on the train split with all voxels, scored like the encoder (per-voxel r).
"""

from __future__ import annotations

import numpy as np
import torch

from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.lit.encoder import EncoderModule, VoxelCorrelation, summarize


@torch.no_grad()
def pooled_features(module: EncoderModule, images: torch.Tensor) -> np.ndarray:
    """(B, L·D) frozen-backbone features: each tapped layer's tokens averaged over tokens (no adapters)."""
    tokens = module.encoder.backbone(images.to(module.device))  # (B, L, T, D)
    return tokens.float().mean(dim=2).flatten(1).cpu().numpy()


def collect(module: EncoderModule, loader, predict: bool = True) -> dict[int, dict[str, list]]:
    """Per subject: backbone features, betas, voxel ids, repeats (and encoder predictions) of every batch."""
    out: dict[int, dict[str, list]] = {}
    module.eval()
    for batch in loader:
        s = int(batch["subject"][0])
        d = out.setdefault(s, {"x": [], "y": [], "pred": [], "n": []})
        d["x"].append(pooled_features(module, batch["image_224"]))
        d["y"].append(batch["betas"].numpy())
        d["n"].append(batch["n_repeats"])
        d["ids"] = batch["voxel_ids"][0]
        if predict:
            d["pred"].append(module.predict_voxels(batch["image_224"].to(module.device), s).float().cpu())
    return out


def ridge_vs_encoder(
    module: EncoderModule, dm_all: NSDDataModule, ncsnr, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Fit RidgeCV per subject on the train split's features; score both encoders on ``split``."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = collect(module, dm_all.make_dataloader("train"), predict=False)
    test = collect(module, dm_all.make_dataloader(split))
    metrics = {name: VoxelCorrelation(module.encoder.total_voxels) for name in ("encoder", "ridge")}
    for s, d in test.items():
        x_tr, y_tr = np.concatenate(train[s]["x"]), np.concatenate(train[s]["y"])
        ridge = make_pipeline(
            StandardScaler(), RidgeCV(alphas=np.logspace(-1, 6, 15), alpha_per_target=True)
        ).fit(x_tr, y_tr)
        y_te, n_rep = torch.from_numpy(np.concatenate(d["y"])), torch.cat(d["n"])
        pred_ridge = torch.from_numpy(ridge.predict(np.concatenate(d["x"])))
        metrics["ridge"].update(pred_ridge, y_te, d["ids"], n_rep)
        metrics["encoder"].update(torch.cat(d["pred"]), y_te, d["ids"], n_rep)
    results = {}
    for name, metric in metrics.items():
        nc = metric.noise_ceiling(ncsnr) if ncsnr is not None else None
        results[name] = summarize(metric.compute(), nc)
    return results
