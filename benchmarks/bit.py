"""BIT training speed and peak memory: the memory-efficient Brain Tokenizer against the dense one.

One training step = forward + loss + backward + AdamW step on random data of the real shapes
(docs/method.md §4–§5): 128 clusters, --voxels sampled voxels per example (with replacement, from one random
subject of --subjects, each with --voxels voxels: the voxel table has subjects × voxels rows), and

* semantic BIT: all 256 queries decoded to 1664-d, MSE;
* low-level BIT: 7,190 queries of which 512 + 512 + 128 + 64 + 16 = 1,232 sampled positions are decoded
  (``query_ids``), InfoNCE per scale.

Variants, each measured in a fresh subprocess so that peaks do not mix (--quick runs them all in one):

* ``dense``: the tokenizer before the rewrite (``ClusterGraphAttention.forward_dense``): materialised
  (B, V, D) voxel tokens, keys and values;
* ``efficient``: ``BIT`` as it is (scores from the table, pooling by ``embedding_bag``);
* ``efficient+ckpt``: the same with ``gradient_checkpointing=True``.

Reported per variant: training samples/s over the --steps timed steps (after --warmup untimed ones),
samples per CPU-second (the figure to trust when other jobs share the cores), peak memory, and the peak's
excess over the memory held after setup (model, AdamW state, batch): on CPU the process's peak RSS
(``ru_maxrss``; after setup = current RSS), on CUDA ``torch.cuda.max_memory_allocated`` (bf16 autocast).
Then the ratios to the dense variant.

usage:
  python benchmarks/bit.py                              # CPU, batch 8, 15,000 voxels (~4 min, 2 cores)
  python benchmarks/bit.py --quick                      # tiny widths, a smoke run in seconds
  python benchmarks/bit.py --device cuda --batch 128    # on a GPU, the paper's semantic batch
  python benchmarks/bit.py --tokenizer-only --presets semantic --variants dense efficient --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("dense", "efficient", "efficient+ckpt")
TOKENS_PER_SCALE = (512, 512, 128, 64, 16)  # sampled VGG positions per scale, docs/method.md §5
SCALE_SIZES = (56 * 56, 55 * 55, 28 * 28, 14 * 14, 7 * 7)  # the 7,190 VGG tokens, scale by scale
QUICK_TOKENS_PER_SCALE = (8, 8, 4, 2, 1)
QUICK_SCALE_SIZES = (30, 30, 20, 10, 5)


def current_rss_mib() -> float:
    """Resident set size of this process now (Linux ``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(preset: str, variant: str, args: argparse.Namespace):
    """Model, optimizer, a batch and the loss function of one measurement, on ``args.device``."""
    import torch
    import torch.nn.functional as F

    from brainit_pl.models.bit import BIT, BIT_LOWLEVEL, BIT_SEMANTIC
    from brainit_pl.models.losses import infonce_per_scale, semantic_mse
    from brainit_pl.models.tokenizer import first_occurrence

    class DenseBIT(BIT):
        """The BIT with the tokenizer as it was: t_v = x_v e_v, keys and values all (B, V, D)."""

        def tokenize(self, x, voxel_ids):
            tokens = x[..., None] * self.voxel_embed[voxel_ids]  # (B, V, D)
            clusters, keep = self.cluster_of_voxel[voxel_ids], first_occurrence(voxel_ids)  # (B, V) each
            brain = self.conv_centers.forward_dense(tokens, clusters, keep, self.centers)  # (B, K, D)
            return self.norm_centers(F.relu(brain))

    config = BIT_SEMANTIC if preset == "semantic" else BIT_LOWLEVEL
    per_scale, sizes = TOKENS_PER_SCALE, SCALE_SIZES
    if args.quick:  # the same code paths at tiny widths
        per_scale, sizes = QUICK_TOKENS_PER_SCALE, QUICK_SCALE_SIZES
        n_out, out_dim = (16, 24) if preset == "semantic" else (sum(sizes), 16)
        config = dataclasses.replace(
            config, dim=32, n_clusters=16, n_heads=4, n_self=2, n_out=n_out, out_dim=out_dim
        )
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    n_table = args.subjects * args.voxels
    labels = torch.randint(0, config.n_clusters, (n_table,), generator=gen)
    cls = DenseBIT if variant == "dense" else BIT
    torch.manual_seed(args.seed)
    model = cls(config, labels, gradient_checkpointing=variant.endswith("+ckpt")).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    b, v = args.batch, args.voxels
    # every example: one random subject, --voxels of its voxels drawn uniformly with replacement
    subject = torch.randint(0, args.subjects, (b, 1), generator=gen)
    voxel_ids = subject * args.voxels + torch.randint(0, args.voxels, (b, v), generator=gen)  # (B, V)
    x = torch.randn(b, v, generator=gen)  # (B, V)
    if preset == "semantic":
        query_ids = None
        target = torch.randn(b, config.n_out, config.out_dim, generator=gen)  # (B, N_out, out_dim)

        def loss_fn(pred, target):
            return semantic_mse(pred, target)
    else:
        starts = torch.tensor((0,) + sizes[:-1]).cumsum(0).tolist()
        query_ids = torch.cat(
            [
                start + torch.randint(0, size, (b, n), generator=gen)
                for start, size, n in zip(starts, sizes, per_scale)
            ],
            dim=1,
        )  # (B, Q): positions sampled scale by scale
        target = torch.randn(b, sum(per_scale), config.out_dim, generator=gen)  # (B, Q, out_dim)

        def loss_fn(pred, target):
            return infonce_per_scale(pred.float(), target, per_scale)

    batch = [t.to(device) if t is not None else None for t in (x, voxel_ids, query_ids, target)]
    # Create AdamW's state now (a step on zero gradients), so the after-setup memory holds it.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, batch, loss_fn


def worker(preset: str, variant: str, args: argparse.Namespace) -> dict:
    """Run --warmup + --steps training steps of one (preset, variant); return its figures."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, opt, (x, voxel_ids, query_ids, target), loss_fn = build(preset, variant, args)
    if cuda:
        torch.cuda.synchronize()
        setup_mib = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        setup_mib = current_rss_mib()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if args.tokenizer_only:  # forward + backward of the Brain Tokenizer alone, no optimizer
                loss = model.tokenize(x, voxel_ids).float().square().mean()
            else:
                loss = loss_fn(model(x, voxel_ids, query_ids), target)
        loss.backward()
        if not args.tokenizer_only:
            opt.step()
        return loss.item()  # also waits for the device

    for _ in range(args.warmup):
        step()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        loss = step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "preset": preset,
        "variant": variant,
        "device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
        "samples_per_s": args.batch * args.steps / seconds,
        "samples_per_cpu_s": args.batch * args.steps / cpu_seconds,
        "step_s": seconds / args.steps,
        "peak_mib": peak_mib,
        "setup_mib": setup_mib,
        "excess_mib": peak_mib - setup_mib,
        "loss": loss,
    }


def measure(pairs: list[str], argv: list[str]) -> list[dict]:
    """Measure ``PRESET:VARIANT`` pairs one after another in a fresh interpreter; one JSON line each."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", *pairs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(pairs)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(pairs) :]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--voxels", type=int, default=15000, help="sampled voxels per example = voxels/subject"
    )
    parser.add_argument("--subjects", type=int, default=8, help="subjects in the voxel table")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument(
        "--presets", nargs="+", default=["semantic", "lowlevel"], choices=["semantic", "lowlevel"]
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny widths and sizes: a smoke run in seconds")
    parser.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="time forward + backward of the Brain Tokenizer alone (no Cross-Transformer, no optimizer)",
    )
    parser.add_argument("--worker", nargs="+", metavar="PRESET:VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # one thread: tiny ops on two threads of a busy machine mostly wait for each other
        args.batch, args.voxels, args.subjects, args.steps, args.warmup = 2, 300, 2, 2, 1
        args.threads = args.threads or 1
    if args.worker:
        import torch

        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        for pair in args.worker:
            print(json.dumps(worker(*pair.split(":"), args)), flush=True)
        return
    argv = [
        f"--batch={args.batch}",
        f"--voxels={args.voxels}",
        f"--subjects={args.subjects}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--device={args.device}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
    ]
    argv += (["--quick"] if args.quick else []) + (["--tokenizer-only"] if args.tokenizer_only else [])
    pairs = [f"{preset}:{variant}" for preset in args.presets for variant in args.variants]
    print(
        f"batch {args.batch}, {args.voxels} voxels/example, voxel table {args.subjects} × {args.voxels}, "
        f"{args.warmup} + {args.steps} timed steps"
        + (", TOKENIZER ONLY (forward + backward)" if args.tokenizer_only else "")
        + (", QUICK: tiny widths, all variants in one process (peaks not comparable)" if args.quick else "")
    )
    print(
        f"{'preset':<9} {'variant':<15} {'samples/s':>10} {'per CPU-s':>10} {'peak MiB':>9} {'excess MiB':>11}"
    )
    # a fresh process per measurement, so that each peak is its own (--quick: one process, it is a smoke run)
    batches = [pairs] if args.quick else [[pair] for pair in pairs]
    results = {}
    for batch in batches:
        for r in measure(batch, argv):
            results[r["preset"], r["variant"]] = r
            print(
                f"{r['preset']:<9} {r['variant']:<15} {r['samples_per_s']:>10.2f} "
                f"{r['samples_per_cpu_s']:>10.2f} {r['peak_mib']:>9.0f} {r['excess_mib']:>11.0f}",
                flush=True,
            )
    device = r["device"]  # the same in every run
    cuda = not device.startswith("cpu")
    memory = "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (ru_maxrss)"
    print(f"device: {device}{' (bf16 autocast)' if cuda else ''}; memory: {memory}")
    for (preset, variant), r in results.items():
        base = results.get((preset, "dense"))
        if base is None or variant == "dense":
            continue
        print(
            f"ratio {preset} {variant}/dense: speed ×{r['samples_per_s'] / base['samples_per_s']:.2f} "
            f"(per CPU-s ×{r['samples_per_cpu_s'] / base['samples_per_cpu_s']:.2f}), "
            f"peak memory ×{r['peak_mib'] / base['peak_mib']:.2f}, "
            f"excess over setup ×{r['excess_mib'] / max(base['excess_mib'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
