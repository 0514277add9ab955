"""New subjects for a trained BIT: the base checkpoint's weights with rows for the new voxels (docs/method.md §7).

Behind :meth:`brainit_pl.lit.bit.BITModule.transfer_from` (``brainit-pl transfer``).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from torch import Tensor

from brainit_pl.errors import require
from brainit_pl.lit.checkpoints import read_checkpoint
from brainit_pl.models.encoder import extended_table, grow_voxel_table


def bit_for_new_subjects(
    cls: Any,
    checkpoint: str | os.PathLike,
    new_voxels: dict[int, int],
    clusters: str | os.PathLike,
    neighbours: tuple[Tensor, Tensor] | None = None,
    **overrides: Any,
) -> Any:
    """A ``cls`` (BITModule) from ``checkpoint`` with ``new_voxels`` added; arguments as ``transfer_from``."""
    ckpt = read_checkpoint(checkpoint, "BITModule")
    hparams = ckpt["hyper_parameters"]
    require(
        hparams.get("decoder", "bit") == "bit",
        f"{checkpoint} is a {hparams.get('decoder')} decoder; transfer adds voxel embeddings to a BIT",
    )
    base = {int(s): int(v) for s, v in hparams["n_voxels"].items()}
    table = extended_table(base, new_voxels, checkpoint)
    names = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in names}
    kwargs.update(
        n_voxels=table,
        clusters=str(clusters),
        trainable="voxel_embed",
        voxel_subjects=sorted(new_voxels),
        **overrides,
    )
    module = cls(**kwargs)
    state = dict(ckpt["state_dict"])
    state["net.voxel_embed"] = grow_voxel_table(state["net.voxel_embed"], base, table, module.net.voxel_embed)
    module.load_state_dict(state, strict=True)
    if neighbours is not None:
        module.net.init_voxels_from(*neighbours)
    return module
