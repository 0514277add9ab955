"""Stage 2 ("adapted CLIP") training step: seconds per step and peak GPU memory at the real shapes.

One step = the :class:`~brainit_pl.lit.stage2.Stage2Module` training step with random weights of the real
sizes: frozen SDXL VAE (float32, outside autocast) on 256² images, semantic BIT (128 clusters, 15,000 voxels
per example, 256 × 1664 tokens) as the UNet's context, the 2.50 B-parameter unCLIP UNet, ε-MSE, backward,
AdamW — under bf16 autocast with gradient checkpointing in BIT and UNet, as the configs run it. The loss is
:meth:`Stage2Module.diffusion_loss` itself (called on a bare module that holds the real-size parts; the
constructor would read a stage-1 checkpoint and MindEye2's weights from disk).

Two trainable sets, each in a fresh process so that peaks do not mix:

* ``all``: BIT and UNet learn (stage 2 of a base model);
* ``voxel_embed``: only the BIT's voxel table (the transfer of a new subject, docs/method.md §7); gradients
  still flow through the frozen UNet.

usage:
  python benchmarks/stage2.py --device cuda --batch 8        # a GPU job (~45 GB for "all")
  python benchmarks/stage2.py --tiny                         # tiny twins on the CPU: a plumbing run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

TRAINABLE = ("all", "voxel_embed")


def worker(trainable: str, args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from brainit_pl.backbones.frozen import FrozenBackbone
    from brainit_pl.lit.stage2 import Stage2Module, ddpm_scheduler
    from brainit_pl.models.bit import BIT, BIT_SEMANTIC, BIT_TINY
    from brainit_pl.models.unclip import IMAGE_SIZE, OFFSET_NOISE, build_unclip_unet, build_unclip_vae

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    subjects, voxels = 8, args.voxels
    config = dataclasses.replace(BIT_TINY, n_out=8, out_dim=32) if args.tiny else BIT_SEMANTIC
    labels = torch.randint(
        0, config.n_clusters, (subjects * voxels,), generator=torch.Generator().manual_seed(0)
    )

    module = nn.Module.__new__(Stage2Module)  # the parts without the constructor's checkpoint loading
    nn.Module.__init__(module)
    module.net = BIT(config, labels, gradient_checkpointing=True).to(device).train()
    module.unet = build_unclip_unet(tiny=args.tiny, device=device).train()
    module.unet.enable_gradient_checkpointing()
    vae = build_unclip_vae(tiny=args.tiny, device=device)
    module.frozen_vae = FrozenBackbone(vae, image_size=IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    module.noise_scheduler = ddpm_scheduler()
    module._hparams = argparse.Namespace(offset_noise=OFFSET_NOISE)  # what diffusion_loss reads
    Stage2Module._set_trainable(module, trainable)
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    for p in params:  # AdamW's state now, so that "after setup" holds it
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    b = args.batch
    gen = torch.Generator().manual_seed(1)
    subject = torch.randint(0, subjects, (b, 1), generator=gen)
    batch = {
        "betas": torch.randn(b, voxels, generator=gen).to(device),  # (B, V)
        "voxel_ids": (subject * voxels + torch.randint(0, voxels, (b, voxels), generator=gen)).to(device),
        "image_224": torch.rand(b, 3, 224, 224, generator=gen).to(device),  # (B, 3, 224, 224)
    }
    if cuda:
        torch.cuda.synchronize()
        setup_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = Stage2Module.diffusion_loss(module, batch, torch.Generator(device).manual_seed(i))
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    seconds = (time.perf_counter() - start) / args.steps
    return {
        "trainable": trainable,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": b,
        "trained_params": sum(p.numel() for p in params),
        "step_s": seconds,
        "samples_per_s": b / seconds,
        "setup_gib": setup_gib if cuda else float("nan"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--batch", type=int, default=8, help="per-GPU batch (the authors: 8 per GPU, 4 accumulated)"
    )
    parser.add_argument("--voxels", type=int, default=15000, help="voxels per example (and per subject)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny twins (CPU plumbing run)")
    parser.add_argument("--trainable", nargs="+", default=list(TRAINABLE), choices=TRAINABLE)
    parser.add_argument("--worker", choices=TRAINABLE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    argv = [a for a in sys.argv[1:]]
    print(
        f"stage-2 training step, batch {args.batch}, {args.voxels} voxels/example, bf16 autocast, checkpointing"
    )
    print("| trainable | trained parameters | s/step | samples/s | GPU memory after setup | peak |")
    print("|---|---|---|---|---|---|")
    for trainable in args.trainable:
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--worker", trainable], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(f"| {trainable} | failed: {done.stderr.strip().splitlines()[-1:]} |||||")
            print(done.stderr[-3000:], file=sys.stderr)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {trainable} | {r['trained_params']:,} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
            f"{r['setup_gib']:.1f} GiB | {r['peak_gib']:.1f} GiB |  ({r['device']}, loss {r['loss']:.3f})"
        )


if __name__ == "__main__":
    main()
