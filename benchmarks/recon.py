"""Reconstruction speed per stage: seconds per image for the unCLIP sampler and the SDXL refinement.

The DIP stage has its own script (``benchmarks/recon_dip.py``: batched vs one image at a time, in one run);
this one times the diffusion stages with random weights — the cost does not depend on the weights:

* unCLIP: :class:`~brainit_pl.models.unclip.UnCLIPSampler` from an init image (36 of 50 Euler steps, each
  a guided UNet call on 2B latents) — the real SDXL-unCLIP shapes with ``--real`` (2.5 B parameters:
  a GPU job; bf16 UNet, float32 VAE), the tiny twin otherwise;
* refine: :func:`~brainit_pl.recon.refine.refine` (8 guided SDXL steps at 768²) — the tiny twin at 64²
  unless ``--real`` (needs the SDXL base file and its config folder in the weights folder).

Prints seconds per image for each, and per denoising step. Numbers go to benchmarks/RESULTS.md.

usage:
  python benchmarks/recon.py                       # tiny twins on the CPU: a plumbing figure
  python benchmarks/recon.py --real --device cuda  # real unCLIP shapes (and --refine-real with SDXL files)
"""

from __future__ import annotations

import argparse
import time

import torch

from brainit_pl.devices import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_unclip(real: bool, device: torch.device, images: int) -> tuple[float, int]:
    """Seconds for ``images`` samples from an init image, and the number of Euler steps run."""
    from brainit_pl.models.unclip import UnCLIPSampler, build_unclip_unet, build_unclip_vae

    unet = build_unclip_unet(tiny=not real, device=device)
    if real and device.type == "cuda":
        unet = unet.to(torch.bfloat16)
    vae = build_unclip_vae(tiny=not real, device=device)
    sampler = UnCLIPSampler(unet, vae, progress=False)
    width = unet.config.cross_attention_dim
    tokens = torch.randn(images, 256, width, device=device)
    init = torch.rand(images, 3, 224, 224, device=device)
    sampler(tokens[:1], init[:1])  # warm-up
    _sync(device)
    start = time.perf_counter()
    sampler(tokens, init, generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    return time.perf_counter() - start, sampler.num_steps - sampler.start_step


def time_refine(real: bool, device: torch.device, images: int) -> tuple[float, int]:
    """Seconds to refine ``images`` images, and the number of denoising steps run."""
    from brainit_pl.recon.refine import build_refiner, refine

    pipe = build_refiner(tiny=not real, device=device)
    size = 768 if real else 64
    x = torch.rand(images, 3, 256, 256, device=device)
    refine(pipe, x[:1], size=size, progress=False)  # warm-up
    _sync(device)
    start = time.perf_counter()
    refine(pipe, x, size=size, progress=False, generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    return time.perf_counter() - start, 8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2, help="images per timed call [2]")
    parser.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    parser.add_argument("--real", action="store_true", help="real SDXL-unCLIP shapes (random weights)")
    parser.add_argument("--refine-real", action="store_true", help="real SDXL refinement (needs its files)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; {args.images} images per call")
    for stage, timer, real in (("unclip", time_unclip, args.real), ("refine", time_refine, args.refine_real)):
        seconds, steps = timer(real, device, args.images)
        per_image = seconds / args.images
        kind = "real shapes" if real else "tiny twin"
        print(
            f"{stage:7s} ({kind}): {per_image:.3f} s/image, {per_image / steps * 1000:.1f} ms/image/step ({steps} steps)"
        )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
