"""NSDDataModule throughput and memory on an NSD-sized subject: samples/s and peak RSS.

Builds (once, cached under --root) a one-subject store of the `full` size — 750 trials per session,
~15.7k voxels — for each session count in --sessions, then iterates the training DataLoader for
--seconds (repeats averaged), once with k = --voxels-per-sample voxels per sample and once with all
voxels (per-subject buckets). Each measurement runs in a fresh process, so its peak RSS (``ru_maxrss``)
is its own; with workers, their private memory (``/proc/PID/smaps_rollup``) is reported beside it. RSS
that does not grow with the session count shows that the betas are streamed, not loaded. samples/s is
wall-clock; samples per CPU-second is the figure to trust when other jobs share the cores.

Two stores: the simulator's `full` preset prepared by `brainit-pl prepare` (default; stimuli kept
small with --image-size since images are not read unless --image-sizes), or with --synthetic-store a
store written directly with random betas and an NSD-like design (40 sessions x 750 trials, 10000 images,
1000 shared, 3 repeats; N sessions = the first N x 750 trials), which needs neither.

usage:
  python benchmarks/datamodule.py --synthetic-store --sessions 10 40 --workers 0 2 --seconds 20
  python benchmarks/datamodule.py --sessions 10 40   # simulate + prepare (slow the first time)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NSD_VOXELS = 15724  # subj01's nsdgeneral
TRIALS_PER_SESSION = 750
N_SESSIONS, N_IMAGES, N_SHARED = 40, 10000, 1000


def synthetic_store(out: Path, sessions: int, seed: int = 0) -> Path:
    """Write a one-subject store of random betas with NSD's design (no images); return ``out``."""
    from tqdm import tqdm

    from brainit_pl.data.store import repeat_index
    from brainit_pl.data.store_writer import SubjectStoreWriter, write_manifest
    from brainit_pl.files import atomic_path

    rng = np.random.default_rng(seed)
    # NSD-like: every image 3 times, presentation order random; N sessions = a prefix of the 40-session run.
    nsd_id = rng.permutation(np.repeat(rng.choice(73000, N_IMAGES, replace=False), 3))
    shared_ids = np.unique(nsd_id)[:N_SHARED]
    n = sessions * TRIALS_PER_SESSION
    nsd_id = nsd_id[:n]
    trials = {
        "nsd_id": nsd_id,
        "session": np.arange(n) // TRIALS_PER_SESSION + 1,
        "trial": np.arange(n) % TRIALS_PER_SESSION,
        "global_trial": np.arange(n),
        "shared": np.isin(nsd_id, shared_ids),
        "repeat": repeat_index(nsd_id),
    }
    with atomic_path(out, is_dir=True) as tmp:
        with SubjectStoreWriter(
            tmp / "subj01.h5",
            subject=1,
            n_trials=n,
            n_voxels=NSD_VOXELS,
            space="func1pt8mm",
            trials_per_session=TRIALS_PER_SESSION,
            source="synthetic",
        ) as w:
            for s in tqdm(range(sessions), desc=f"synthetic store, {sessions} sessions", unit="session"):
                block = rng.standard_normal((TRIALS_PER_SESSION, NSD_VOXELS), dtype=np.float32)
                w.write_betas(s * TRIALS_PER_SESSION, block)
            w.write_trials(trials)
            w.write_voxels(np.zeros((NSD_VOXELS, 3)), np.zeros((NSD_VOXELS, 3)))
        write_manifest(
            tmp,
            {1: {"file": "subj01.h5", "n_voxels": NSD_VOXELS, "n_trials": n}},
            images=None,
            source={"kind": "synthetic", "sessions": sessions},
        )
    return out


def simulated_store(out: Path, sessions: int, image_size: int) -> Path:
    """Simulate the `full` preset (one subject, ``sessions`` sessions) and prepare it; return the store."""
    from brainit_pl.data.prepare import prepare
    from brainit_pl.data.sim.simulate import simulate

    nsd = simulate(out.parent / "nsd", preset="full", subjects=1, image_size=image_size, sessions=sessions)
    return prepare(nsd, out)


def ensure_store(args: argparse.Namespace, sessions: int) -> Path:
    kind = "synthetic" if args.synthetic_store else f"simulated-{args.image_size}px"
    out = Path(args.root) / f"{kind}-{sessions}sessions" / "store"
    if not (out / "manifest.json").is_file():
        (
            synthetic_store(out, sessions)
            if args.synthetic_store
            else simulated_store(out, sessions, args.image_size)
        )
    return out


def _private_mib(pid: int) -> float:
    """Memory only process ``pid`` holds (private pages, not the libraries it shares with its parent)."""
    kib = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib / 1024


def _worker_mib() -> float:
    """Private memory of this process's children (the DataLoader workers), summed; 0 without /proc."""
    pid = os.getpid()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sum(_private_mib(int(c)) for c in children)
    except OSError:
        return 0.0


def measure(
    store: str,
    k: int | None,
    workers: int,
    seconds: float,
    batch_size: int,
    image_sizes: list[int],
    threads: int = 1,
) -> dict:
    """Iterate the training DataLoader for ``seconds`` (after a warm-up); throughput and memory."""
    import torch

    from brainit_pl.data.datamodule import NSDDataModule

    # The batch arithmetic runs in this process only with workers=0. torch's default of one thread per
    # core collapses when other jobs share the cores (OpenMP threads spin-wait for each other), and in
    # training the cores belong to the model anyway; workers use one thread each (torch's default there).
    torch.set_num_threads(threads)

    dm = NSDDataModule(
        store,
        voxels_per_sample=k,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=False,
        image_sizes=image_sizes,
    )
    dm.setup("fit")
    rss_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loader = dm.train_dataloader()
    samples, epoch, start, cpu_start, worker_mib, next_probe = 0, 0, None, 0.0, 0.0, 0.0
    while start is None or time.perf_counter() - start < seconds:
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            now = time.perf_counter()
            if start is None and i == 5:  # warm-up: worker start-up and first reads excluded
                start, cpu_start = now, time.process_time()
            elif start is not None:
                samples += len(batch["nsd_id"])
                if now >= next_probe and workers:
                    worker_mib, next_probe = max(worker_mib, _worker_mib()), now + 0.5
                if now - start >= seconds:
                    break
        epoch += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del loader, batch  # the workers exit and are reaped, so RUSAGE_CHILDREN counts their CPU time
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += children.ru_utime + children.ru_stime  # workers: their whole life, warm-up included
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "samples_per_s": samples / elapsed,
        # Robust to other processes sharing the cores: samples per second of CPU this run used.
        "samples_per_cpu_s": samples / cpu,
        "samples": samples,
        "seconds": elapsed,
        "rss_init_mib": rss_init / kib,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        # Not RUSAGE_CHILDREN's ru_maxrss: a forked worker's RSS counts every page it shares with the
        # main process (torch alone is ~500 MiB), which says nothing about what the worker costs.
        "worker_private_mib": worker_mib,
        "train_samples": len(dm.samples["train"]),
        "store_mib": sum(f.stat().st_size for f in Path(store).glob("*.h5")) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/brainit-bench", help="cache folder of the stores")
    parser.add_argument("--sessions", type=int, nargs="+", default=[10, 40], help="session counts to compare")
    parser.add_argument("--voxels-per-sample", type=int, default=15000, help="k of the sampled run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to try")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--image-sizes", type=int, nargs="*", default=[], help="also read stimuli (not synthetic)"
    )
    parser.add_argument(
        "--image-size", type=int, default=64, help="simulated stimulus size (simulated store)"
    )
    parser.add_argument(
        "--synthetic-store", action="store_true", help="random-betas store instead of simulate"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in this process
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.measure:
        result = measure(
            args.measure,
            args.k,
            args.workers[0],
            args.seconds,
            args.batch_size,
            args.image_sizes,
            args.threads,
        )
        print(json.dumps(result))
        return

    header = (
        f"{'sessions':>8} {'voxels':>8} {'workers':>7} {'samples/s':>9} {'/CPU-s':>7} {'RSS init':>9} "
        f"{'RSS peak':>9} {'workers':>9} {'store':>8}"
    )
    print(header, flush=True)
    for sessions in args.sessions:
        store = ensure_store(args, sessions)
        for k in (args.voxels_per_sample, None):
            for workers in args.workers:
                cmd = [sys.executable, __file__, "--measure", str(store), "--workers", str(workers)]
                cmd += ["--seconds", str(args.seconds), "--batch-size", str(args.batch_size)]
                cmd += ["--threads", str(args.threads)]
                cmd += ["--image-sizes", *map(str, args.image_sizes), *(["--k", str(k)] if k else [])]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                voxels = f"k={k}" if k else "all"
                print(
                    f"{sessions:>8} {voxels:>8} {workers:>7} {r['samples_per_s']:>9.0f} "
                    f"{r['samples_per_cpu_s']:>7.0f} {r['rss_init_mib']:>7.0f}Mi {r['rss_peak_mib']:>7.0f}Mi "
                    f"{r['worker_private_mib']:>7.0f}Mi {r['store_mib']:>6.0f}Mi",
                    flush=True,
                )
    print(
        f"\nbatch {args.batch_size}, repeats averaged, train split, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, {args.threads} torch thread(s); images: {args.image_sizes or 'none'}. RSS init: main process after imports "
        "and setup; RSS peak: its high-water mark while iterating; workers: the workers' private memory."
    )


if __name__ == "__main__":
    main()
