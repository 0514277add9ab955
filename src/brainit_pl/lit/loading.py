"""Trained modules from their checkpoints: the one door through which reconstruction reads ``lit``'s files.

:mod:`brainit_pl.recon` turns brain activity into images with trained BITs; it must not depend on how the
LightningModules are built. This module is the only part of :mod:`brainit_pl.lit` it imports: each loader
takes a checkpoint path and returns a module in eval mode, or refuses the file with one line
(:func:`load_bit`: a stage-1 BIT of one branch; :func:`load_stage2`: the stage-2 model).
"""

from __future__ import annotations

import contextvars
import pickle
from pathlib import Path

import torch

from brainit_pl.errors import BrainITError, require
from brainit_pl.files import load_module
from brainit_pl.lit.bit import BITModule
from brainit_pl.lit.stage2 import Stage2Module

READ_ERRORS = (
    KeyError,
    TypeError,
    AttributeError,
    ValueError,
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
)


def load_bit(path: Path, branch: str, device: torch.device):
    """A ``BITModule`` checkpoint of ``branch`` (``"lowlevel"`` or ``"semantic"``), in eval mode on ``device``."""
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} not found")
    try:
        module = _fresh(BITModule, path)
    except BrainITError:
        raise
    except READ_ERRORS as err:
        raise BrainITError(
            f"{path} is not a BIT checkpoint of `brainit-pl fit` with model BITModule ({type(err).__name__}: {err})"
        ) from err
    require(
        module.hparams.branch == branch,
        f"{path} is a {module.hparams.branch} BIT checkpoint; --{branch} needs a {branch} one",
    )
    return module.to(device).eval()


def load_stage2(path: Path, device: torch.device):
    """A ``Stage2Module`` checkpoint (adapted BIT + fine-tuned UNet; VAE frozen), in eval mode on ``device``.

    The module is rebuilt from its hyperparameters, so its stage-1 ``bit_checkpoint`` (and that BIT's
    ``clusters`` file) and the unCLIP weights it started from must still be where training found them; the
    fine-tuned weights then come from ``path``.
    """
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} not found")
    try:
        module = _fresh(Stage2Module, path)
    except BrainITError as err:
        if str(err).startswith(str(path)):  # already names the file
            raise
        raise BrainITError(f"{path}: {err}") from err
    except READ_ERRORS as err:
        raise BrainITError(
            f"{path} is not a stage-2 checkpoint of `brainit-pl fit` with model Stage2Module "
            f"({type(err).__name__}: {err})"
        ) from err
    return module.to(device).eval()


def _fresh(cls, path: Path):
    """``cls.load_from_checkpoint`` in a fresh context: inside a LightningCLI instantiation (a BrainITModule
    built by ``brainit-pl test``) a context variable would hand the outer module's hyperparameters to this
    module's ``save_hyperparameters()``."""
    return contextvars.Context().run(load_module, cls, path)
