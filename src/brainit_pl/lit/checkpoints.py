"""Reading and checking brainit-pl's own Lightning checkpoints, shared by every LightningModule.

* :func:`read_checkpoint`: a checkpoint as a dict, refused with one line when it is not one of ours.
* :func:`checkpoint_dict`: a module as a checkpoint without a Trainer.
* :func:`architecture_differences`, :func:`file_digest`: what makes a checkpoint fit the module that loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from brainit_pl.errors import BrainITError, require
from brainit_pl.files import load_checkpoint


def read_checkpoint(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (CPU), with ``state_dict`` and ``hyper_parameters['n_voxels']``.

    Read with :func:`brainit_pl.files.load_checkpoint` (``weights_only``: a crafted file is refused, not run).
    """
    require(os.path.isfile(path), f"checkpoint {path} not found")
    try:
        # mmap: tensors are read when used, so reading a large checkpoint's hyperparameters costs little
        ckpt = load_checkpoint(path, mmap=True)
    except BrainITError:
        raise
    except Exception as err:  # torch raises many types for a foreign file
        raise BrainITError(f"{path} is not a readable {what} checkpoint ({type(err).__name__})") from err
    require(
        isinstance(ckpt, dict) and "state_dict" in ckpt and "n_voxels" in ckpt.get("hyper_parameters", {}),
        f"{path} is not a {what} checkpoint (no state_dict and hyper_parameters['n_voxels'])",
    )
    return ckpt


def checkpoint_dict(module: Any) -> dict[str, Any]:
    """A LightningModule as a Lightning checkpoint without a Trainer (weights and hyperparameters only)."""
    import lightning

    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def file_digest(path: str | Path) -> str:
    """sha1 of a file's bytes (the clusters a BIT was trained with are recorded by content, not path)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def architecture_differences(
    saved: Mapping[str, Any], ours: Mapping[str, Any], names: Iterable[str]
) -> list[str]:
    """``"name: checkpoint X vs config Y"`` for each hyperparameter in ``names`` that differs."""
    ours = dict(ours)
    return [
        f"{name}: checkpoint {_plain(saved.get(name))} vs config {_plain(ours.get(name))}"
        for name in names
        if _plain(saved.get(name)) != _plain(ours.get(name))
    ]


def _plain(value: Any) -> Any:
    """Hparams as plain comparable values (tuples and lists alike, dict keys as ints where they are)."""
    if isinstance(value, dict):
        return {int(k) if str(k).isdigit() else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
