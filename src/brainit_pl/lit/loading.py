"""Trained modules from their checkpoints: the one door through which reconstruction reads ``lit``'s files.

:mod:`brainit_pl.recon` turns brain activity into images with trained BITs; it must not depend on how the
LightningModules are built. This module is the only part of :mod:`brainit_pl.lit` it imports: each loader
takes a checkpoint path and returns a module in eval mode, or refuses the file with one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from brainit_pl.errors import BrainITError, require
from brainit_pl.lit.bit import BITModule


def load_bit(path: Path, branch: str, device: torch.device):
    """A ``BITModule`` checkpoint of ``branch`` (``"lowlevel"`` or ``"semantic"``), in eval mode on ``device``."""
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} not found")
    try:
        module = BITModule.load_from_checkpoint(path, map_location="cpu")
    except BrainITError:
        raise
    except (
        KeyError,
        TypeError,
        AttributeError,
        ValueError,
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
    ) as err:
        raise BrainITError(
            f"{path} is not a BIT checkpoint of `brainit-pl fit` with model BITModule ({type(err).__name__}: {err})"
        ) from err
    require(
        module.hparams.branch == branch,
        f"{path} is a {module.hparams.branch} BIT checkpoint; --{branch} needs a {branch} one",
    )
    return module.to(device).eval()
