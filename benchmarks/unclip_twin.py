"""Does the pretrained tiny unCLIP twin sample images of the stimulus kind that follow the CLIP tokens?

The tiny unCLIP twin pretrained on a store's images (``brainit-pl fit --config
configs/sim/unclip_pretrain_demo.yaml``, :class:`~brainit_pl.lit.unclip_pretrain.UnCLIPPretrainModule`) is
sampled from scratch (no init image, all 50 Euler steps, guidance 5: the method's sampler) on the store's
held-out **shared** images, which pretraining never sees, and scored against their ground truth with the
tiny metric networks (two-way identification) and PixCorr/SSIM, each with a 95 % bootstrap interval over
images. Systems, all from the same start noise:

* ``random twin``: the seeded random tiny twin (what the demo sampled before), true tokens;
* ``pretrained, true tokens``: the image's own tiny-CLIP tokens (``STORE/features_clip.h5``);
* ``pretrained, noise tokens``: N(0, 1) tokens, the sampler's unconditional input (what the model draws
  without a condition: images of the stimulus kind, but not of *this* image);
* ``pretrained, shuffled tokens``: another test image's tokens (a control: identification at chance);
* ``VAE round trip``: the pretrained VAE's encode → decode of the ground truth (the ceiling of the decoder);
* ``blurred ground truth (init)``: the ground truth through 16² and back, a stand-in for the low-level (DIP)
  image the reconstruction chain starts the semantic stage from, and ``random twin`` / ``pretrained, from the
  init``: the chain's img2img from it (noised to step 14 of 50, true tokens).

Paired bootstraps compare "pretrained, true tokens" with the random twin and with noise tokens, and the two
twins from the init. The picture's rows: ground truth | random twin | pretrained, true tokens | pretrained,
noise tokens | blurred init | random twin from it | pretrained from it.

usage (after ``brainit-pl simulate --preset demo`` + ``prepare`` + ``extract-features --tiny``):
  python benchmarks/unclip_twin.py --store runs/demo_store --checkpoint runs/unclip_tiny.ckpt
  (the checkpoint is trained first, and timed, when it does not exist)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
METRICS = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip")
SYSTEMS = (
    "random twin",
    "pretrained, true tokens",
    "pretrained, noise tokens",
    "pretrained, shuffled tokens",
    "VAE round trip",
    "blurred ground truth (init)",
    "random twin, from the init",
    "pretrained, from the init",
)


def pretrain(store: Path, checkpoint: Path, root: Path, extra: list[str]) -> float:
    """Train the twin with the demo config through the CLI; the wall-clock seconds."""
    from brainit_pl.cli import main

    start = time.perf_counter()
    code = main(
        [
            "fit",
            *("--config", str(HERE.parent / "configs/sim/unclip_pretrain_demo.yaml")),
            *("--data.store", str(store), "--model.init_args.export", str(checkpoint)),
            *("--trainer.default_root_dir", str(root), *extra),
        ]
    )
    assert code in (0, None), f"brainit-pl fit exited with {code}"
    return time.perf_counter() - start


def test_images(store: Path, subject: int, limit: int | None) -> dict[str, torch.Tensor]:
    """The shared test images of one subject: ``image_224`` (N, 3, 224, 224), ``clip_tokens``, ``nsd_id``."""
    from brainit_pl.data.datamodule import NSDDataModule

    dm = NSDDataModule(str(store), subjects=[subject], image_sizes=[224], features=["clip"], batch_size=50)
    dm.setup("test")
    keys = ("image_224", "clip_tokens", "nsd_id")
    parts = {k: [] for k in keys}
    for batch in dm.test_dataloader():
        for k in keys:
            parts[k].append(batch[k])
    out = {k: torch.cat(v) for k, v in parts.items()}
    return {k: v[:limit] for k, v in out.items()} if limit else out


def sample(
    models, tokens: torch.Tensor, *, image_size: int, seed: int, batch: int, init: torch.Tensor | None = None
) -> torch.Tensor:
    """unCLIP samples (N, 3, 224, 224) in [0, 1], from scratch or from ``init`` images (noised to step 14 of
    50, as the chain does with the DIP image); the noise keyed by ``seed`` and the batch."""
    from brainit_pl.models.unclip import UnCLIPSampler

    sampler = UnCLIPSampler(models.unet, models.vae, image_size=image_size, progress=False)
    out = []
    for i in range(0, len(tokens), batch):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        start = None if init is None else init[i : i + batch]
        images = sampler(tokens[i : i + batch], init_images=start, generator=gen)
        out.append(F.interpolate(images, size=(224, 224), mode="bilinear", antialias=False))
    return torch.cat(out)


@torch.no_grad()
def round_trip(models, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """The VAE's encode (posterior mean) → decode of images, at ``image_size``, back at 224²."""
    from brainit_pl.models.unclip import UnCLIPSampler

    sampler = UnCLIPSampler(models.unet, models.vae, image_size=image_size, progress=False)
    x = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    z = models.vae.encode(x * 2 - 1).latent_dist.mean * models.vae.config.scaling_factor
    return F.interpolate(sampler.decode(z), size=(224, 224), mode="bilinear", antialias=False)


def score(recons: torch.Tensor, gt: torch.Tensor, nets) -> dict[str, torch.Tensor]:
    """Per-image values of :data:`METRICS` (MindEye2 protocol, the tiny metric networks)."""
    from brainit_pl.metrics.suite import build_eval_suite, per_image_values

    suite = build_eval_suite("mindeye2", feature_nets=nets, retrieval=False)
    suite.update(recons=recons, gt=gt)
    values = per_image_values(suite)
    return {m: values[m] for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("runs/demo_store"))
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/unclip_tiny.ckpt"))
    parser.add_argument("--subject", type=int, default=1, help="whose shared images (all share them) [1]")
    parser.add_argument("--limit", type=int, help="first N test images [all]")
    parser.add_argument("--image-size", type=int, default=64, help="the pretraining's image_size [64]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "unclip_twin.json")
    parser.add_argument("--picture", type=Path, default=HERE / "results" / "unclip_twin.png")
    parser.add_argument(
        "--fit-seconds",
        type=float,
        help="the measured pretraining time of an existing --checkpoint (recorded)",
    )
    parser.add_argument("fit_args", nargs="*", help="extra `brainit-pl fit` arguments for the pretraining")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: one thread is fastest

    from brainit_pl.metrics.bootstrap import bootstrap_ci, paired_bootstrap
    from brainit_pl.metrics.suite import HIGHER_IS_BETTER, build_feature_nets
    from brainit_pl.models.unclip import load_unclip
    from brainit_pl.viz.grids import save_image_grid

    fit_seconds = args.fit_seconds
    if not args.checkpoint.exists():
        fit_seconds = pretrain(args.store, args.checkpoint, args.checkpoint.with_suffix(""), args.fit_args)
    data = test_images(args.store, args.subject, args.limit)
    gt, tokens = data["image_224"], data["clip_tokens"]
    n = len(gt)
    random_twin = load_unclip(None, tiny=True)
    pretrained = load_unclip(args.checkpoint, tiny=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    noise_tokens = torch.randn(tokens.shape, generator=gen)
    shuffled = tokens[torch.roll(torch.arange(n), 1)]
    kw = {"image_size": args.image_size, "seed": args.seed, "batch": args.batch}
    # A stand-in for the low-level (DIP) image the chain starts the semantic stage from: the ground truth
    # through 16² (area) and back, blurred and without detail.
    small = F.interpolate(gt, size=(16, 16), mode="area")
    blurred = F.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False).clamp(0, 1)
    start = time.perf_counter()
    images = {
        "random twin": sample(random_twin, tokens, **kw),
        "pretrained, true tokens": sample(pretrained, tokens, **kw),
        "pretrained, noise tokens": sample(pretrained, noise_tokens, **kw),
        "pretrained, shuffled tokens": sample(pretrained, shuffled, **kw),
        "VAE round trip": round_trip(pretrained, gt, args.image_size),
        "blurred ground truth (init)": blurred,
        "random twin, from the init": sample(random_twin, tokens, init=blurred, **kw),
        "pretrained, from the init": sample(pretrained, tokens, init=blurred, **kw),
    }
    sample_seconds = time.perf_counter() - start
    nets = build_feature_nets("mindeye2", nets="tiny")
    values = {name: score(recons, gt, nets) for name, recons in images.items()}

    results = {
        name: {m: {"mean": float(v.mean()), "ci95": list(bootstrap_ci(v))} for m, v in per.items()}
        for name, per in values.items()
    }
    best = values["pretrained, true tokens"]
    paired = {
        f"pretrained, true tokens − {other}": {
            m: paired_bootstrap(best[m], values[other][m], higher_is_better=HIGHER_IS_BETTER[m]).to_dict()
            for m in METRICS
        }
        for other in ("random twin", "pretrained, noise tokens")
    }
    paired["pretrained, from the init − random twin, from the init"] = {
        m: paired_bootstrap(
            values["pretrained, from the init"][m],
            values["random twin, from the init"][m],
            higher_is_better=HIGHER_IS_BETTER[m],
        ).to_dict()
        for m in METRICS
    }
    report = {
        "store": str(args.store),
        "checkpoint": str(args.checkpoint),
        "subject": args.subject,
        "n_images": n,
        "image_size": args.image_size,
        "sampler": "from scratch, 50 Euler steps, guidance 5, noise tokens unconditional",
        "metric_nets": "tiny (mindeye2 protocol)",
        "fit_seconds": fit_seconds,
        "sample_seconds_6_samplings": sample_seconds,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.processor()}",
        "results": results,
        "paired": paired,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    show = 8
    save_image_grid(
        args.picture,
        [
            gt[:show],
            *(
                images[s][:show]
                for s in ("random twin", "pretrained, true tokens", "pretrained, noise tokens")
            ),
            *(images[s][:show] for s in ("blurred ground truth (init)", "random twin, from the init")),
            images["pretrained, from the init"][:show],
        ],
        size=96,
    )

    print(f"{n} shared test images of subject {args.subject}, {args.image_size}², tiny metric networks")
    print("| system | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, per in results.items():
        cells = [f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in per.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for label, per in paired.items():
        cells = [
            f"{p['mean_diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] {p['verdict']}"
            for p in per.values()
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"fit {fit_seconds} s, sampling {sample_seconds:.1f} s; wrote {args.out} and {args.picture}")


if __name__ == "__main__":
    main()
