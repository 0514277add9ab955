"""Device choice and inference precision for the project's batch jobs (extract, synthesize, evaluate)."""

from __future__ import annotations

import contextlib

import torch

from brainit_pl.errors import BrainITError, require


def resolve_device(device: str | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; a named device must exist (one-line error otherwise)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise BrainITError(f"--device {device!r} is not a torch device ({err})") from err
    require(
        dev.type != "cuda" or torch.cuda.is_available(),
        f"--device {device}: CUDA is not available; use --device cpu",
    )
    return dev


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 (else fp16) autocast on CUDA; float32 on CPU, where half-precision matmuls are slow."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
