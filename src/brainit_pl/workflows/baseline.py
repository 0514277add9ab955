"""The linear pixel decoder on the images of a ``reconstruct`` folder: the floor every stage must beat.

``make demo`` reconstructs a few shared test images per subject; this puts the linear baseline decoder's
images of *the same* test images beside them (``OUT/subjNN/linear/``) and scores them with the same metric
networks (``OUT/metrics_linear/``), so a stage and the baseline are compared image for image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from brainit_pl.errors import require

STAGE = "linear"


def linear_stage(ckpt: Path, store: Path, folder: Path, *, nets: str = "tiny") -> dict[str, Any]:
    """Write the LinearDecoder's images of ``folder``'s ground-truth images and score them.

    Args:
        ckpt: a ``LinearDecoder`` checkpoint (``brainit-pl fit --config configs/demo.yaml``).
        store: the store ``folder`` was reconstructed from.
        folder: a finished ``brainit-pl reconstruct`` output (its ``gt/subjNN/*.png`` pick the images).
        nets: the metric networks.

    Returns:
        The metrics results dict (metrics.json's content).
    """
    from brainit_pl.data.datamodule import NSDDataModule
    from brainit_pl.lit.baseline import LinearDecoder
    from brainit_pl.metrics.evaluate import evaluate_folders
    from brainit_pl.recon.reconstruct import save_batch

    wanted = {
        int(sub.name[4:]): {int(p.stem) for p in sub.glob("*.png")}
        for sub in sorted((folder / "gt").glob("subj*"))
    }
    require(bool(wanted), f"{folder} holds no ground-truth images (gt/subjNN/*.png): run reconstruct first")
    model = LinearDecoder.load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = NSDDataModule(str(store), subjects=sorted(wanted), image_sizes=[224], eval_batch_size=16)
    dm.setup("test")
    with torch.no_grad():
        for batch in dm.test_dataloader():
            subject = int(batch["subject"][0])
            keep = [i for i, n in enumerate(batch["nsd_id"].tolist()) if n in wanted.get(subject, ())]
            if not keep:
                continue
            part = {k: v[torch.tensor(keep)] for k, v in batch.items()}
            images = model(part["betas"], part["voxel_ids"])  # (B, 3, s, s) in [0, 1]
            images = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
            save_batch(folder, part, {STAGE: images})
    results, _ = evaluate_folders(
        folder, folder / "gt", folder / f"metrics_{STAGE}", kind=STAGE, nets=nets, device="cpu"
    )
    return results
