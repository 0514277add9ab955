"""Soak under load (issue #19, item 6): a long DataLoader run and a DDP fit killed and resumed three times.

Part ``loader``: the NSDDataModule's training DataLoader with --workers worker processes over one
NSD-sized simulated subject (the simulator's ``full`` preset, subject 1: 40 sessions x 750 trials, 10000
images, ~14.3k ROI voxels; stimuli simulated at --image-size pixels, prepared to the store's 224/112),
for --batches batches (epochs follow one another, persistent workers). Every --every batches it samples
the resident memory (VmRSS) and the open file descriptors of the main process and of each worker, plus
the workers' private memory (``smaps_rollup``), and reports them at start / middle / end with the slope of
a least-squares line (MiB per 1000 batches; over the second half too, after the page cache and the
allocators have settled). Then a second, separate process reads the first --hash-batches batches with the
same seed and the two SHA-256 digests of their contents are compared (identical batches on re-run).

Part ``ddp``: ``brainit-pl fit`` of configs/tiny.yaml on the ``tiny`` simulated store, 2 CPU processes
(gloo DDP), run once uninterrupted, then run again and killed (SIGKILL to its process group, mid-epoch)
and resumed with ``--ckpt_path last`` --kills times in a row. The resumed run must end where the
uninterrupted one did: the epoch and step, the weights of ``last.ckpt`` (max abs difference) and the best
checkpoint (file name and score). Each run gets its own free MASTER_PORT and none of the launcher
variables of this process (RANK, WORLD_SIZE, ...). The per-batch progress and delay come from the
test callback tests/resume_progress.py, as in tests/test_resume.py.

Both parts print their figures and write JSON under benchmarks/results/ (soak_loader_wW_bB.json for W
workers and B batches, soak_ddp_kK.json for K kills). The simulated NSD roots and stores are kept under
--work and reused.

usage:
  python benchmarks/soak.py                                  # both parts, defaults (8 workers, 10000 batches)
  python benchmarks/soak.py --part loader --workers 4 --batches 2000
  python benchmarks/soak.py --part ddp --kills 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # DIST_VARS, _best_state and the Progress callback of the tests

from datamodule import _private_mib  # noqa: E402 - benchmarks/datamodule.py, beside this file

MIB = 1024.0  # /proc reports KiB


# ------------------------------------------------------------------------------------------- stores
def simulated_store(work: Path, preset: str, **overrides) -> Path:
    """Simulate ``preset`` (seed 0, ``overrides``: see ``simulate``) and prepare it, reusing both.

    The NSD root goes to WORK/NAME/nsd and the store to WORK/NAME/store, NAME being the preset and its
    overrides (e.g. ``full-subjects1-image_size64``).
    """
    from brainit_pl.data.prepare import prepare
    from brainit_pl.data.sim.simulate import simulate

    name = "-".join([preset, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
    nsd, store = work / name / "nsd", work / name / "store"
    if (store / "manifest.json").is_file():
        return store
    if not nsd.is_dir():  # simulate writes into a temporary folder: OUT exists only once complete
        simulate(nsd, preset=preset, seed=0, **overrides)
    return prepare(nsd, store)


# ------------------------------------------------------------------------------------------- /proc
def _status_kib(pid: int, field: str) -> float:
    """One ``/proc/PID/status`` field in KiB (e.g. ``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


def _n_fds(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (the DataLoader workers of the main process)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def probe(batch: int) -> dict:
    """Memory and file descriptors of this process and of its workers, after ``batch`` batches."""
    me = os.getpid()
    workers = _children(me)
    return {
        "batch": batch,
        "main_rss_mib": _status_kib(me, "VmRSS") / MIB,
        "main_fds": _n_fds(me),
        "workers": len(workers),
        "workers_rss_mib": sum(_status_kib(w, "VmRSS") for w in workers) / MIB,
        "workers_private_mib": sum(_private_mib(w) for w in workers),
        "workers_fds": sum(_n_fds(w) for w in workers),
    }


# ---------------------------------------------------------------------------------- part (a): loader
def _hash_batch(digest, batch: dict) -> None:
    """Feed every tensor of ``batch`` (keys sorted) into ``digest``."""
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(batch[key].numpy().tobytes())


def iterate(args: argparse.Namespace, store: str, batches: int, every: int) -> dict:
    """Read ``batches`` training batches (epoch after epoch); probes every ``every`` and a content hash."""
    import torch

    from brainit_pl.data.datamodule import NSDDataModule

    torch.set_num_threads(1)  # see benchmarks/datamodule.py: the workers and the shared cores
    dm = NSDDataModule(
        store,
        voxels_per_sample=args.voxels_per_sample,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
        image_sizes=args.image_sizes,
        persistent_workers=True,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    digest, probes, n, epoch, start = hashlib.sha256(), [], 0, 0, time.perf_counter()
    while n < batches:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if n < args.hash_batches:
                _hash_batch(digest, batch)
            n += 1
            if n == 1 or n % every == 0 or n == batches:
                probes.append(probe(n))
            if n >= batches:
                break
        epoch += 1
    return {
        "batches": n,
        "epochs": epoch,
        "batches_per_epoch": len(loader),
        "seconds": time.perf_counter() - start,
        "hash_batches": min(n, args.hash_batches),
        "sha256": digest.hexdigest(),
        "n_voxels": dm.n_voxels,
        "train_samples": len(dm.samples["train"]),
        "probes": probes,
    }


def _slope(probes: list[dict], key: str) -> float:
    """Least-squares growth of ``key`` in units per 1000 batches."""
    x = np.array([p["batch"] for p in probes], dtype=float)
    y = np.array([p[key] for p in probes], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 1000) if len(x) >= 2 else 0.0


def summarize_probes(probes: list[dict]) -> dict:
    """Start / middle / end, min / max and slopes (all probes, second half) of each probed figure.

    File descriptor counts fluctuate while batches are in flight (each tensor a worker sends travels as a
    shared-memory descriptor), so their min / max say more than a slope: bounded = no leak.
    """
    half = probes[len(probes) // 2 :]
    keys = [k for k in probes[0] if k not in ("batch", "workers")]
    return {
        k: {
            "start": probes[0][k],
            "middle": probes[len(probes) // 2][k],
            "end": probes[-1][k],
            "min": min(p[k] for p in probes),
            "max": max(p[k] for p in probes),
            "slope_per_1000": _slope(probes, k),
            "slope_per_1000_second_half": _slope(half, k),
        }
        for k in keys
    }


def _child_iterate(args: argparse.Namespace, store: Path, batches: int) -> dict:
    """:func:`iterate` in a fresh process (its own memory, its own worker processes)."""
    cmd = [sys.executable, __file__, "--iterate", str(store), "--batches", str(batches)]
    cmd += ["--workers", str(args.workers), "--every", str(args.every), "--seed", str(args.seed)]
    cmd += ["--batch-size", str(args.batch_size), "--voxels-per-sample", str(args.voxels_per_sample)]
    cmd += ["--hash-batches", str(args.hash_batches), "--image-sizes", *map(str, args.image_sizes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def loader_soak(args: argparse.Namespace) -> dict:
    """Part (a): the long run, then a separate re-run of the first batches; print and return the report."""
    store = simulated_store(args.work, args.preset, subjects=1, image_size=args.image_size)
    long = _child_iterate(args, store, args.batches)
    again = _child_iterate(args, store, min(args.hash_batches, args.batches))
    summary = summarize_probes(long["probes"])
    report = {
        "store": str(store),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "voxels_per_sample": args.voxels_per_sample,
        "image_sizes": args.image_sizes,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        **{k: v for k, v in long.items() if k != "probes"},
        "identical_on_rerun": long["sha256"] == again["sha256"],
        "rerun_sha256": again["sha256"],
        "summary": summary,
        "probes": long["probes"],
    }
    print(
        f"loader soak: {report['batches']} batches ({report['epochs']} epochs of {report['batches_per_epoch']}), "
        f"{args.workers} workers, {report['n_voxels']} voxels, {report['seconds']:.0f} s"
    )
    for key, s in summary.items():
        print(
            f"  {key:>20}: start {s['start']:8.1f}  middle {s['middle']:8.1f}  end {s['end']:8.1f}  "
            f"[{s['min']:.0f}, {s['max']:.0f}]  slope {s['slope_per_1000']:+7.2f}/1000 batches "
            f"(second half {s['slope_per_1000_second_half']:+7.2f})"
        )
    print(
        f"  first {report['hash_batches']} batches identical in a second process: {report['identical_on_rerun']}"
    )
    return report


# ------------------------------------------------------------------------------------- part (b): DDP
def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_config(work: Path, epochs: int) -> Path:
    """configs/tiny.yaml for ``epochs`` epochs with the Progress callback (WORK/progress), as tests/test_resume.py."""
    from test_resume import _config

    return _config(work, epochs)


def start_fit(config: Path, store: Path, root: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    """``brainit-pl fit`` on 2 CPU processes (DDP), in its own process group, with a fresh MASTER_PORT."""
    from test_fit import DIST_VARS

    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(HF_HUB_OFFLINE="1", BRAINIT_TEST_BATCH_DELAY=str(delay), MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "brainit_pl.cli", "fit", "--config", str(config), "--data.store", str(store)]
    cmd += ["--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu"]
    cmd += ["--trainer.devices", "2", "--trainer.strategy", "ddp", *extra]
    with open(root.parent / f"{root.name}.log", "a") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 1200) -> None:
    """Wait for a fit to end; raise if it failed (its output is in the .log beside its folder)."""
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"fit failed (exit {proc.returncode}); see the .log beside its folder")


def kill_mid_epoch(proc: subprocess.Popen, progress: Path, epoch: int, timeout: float = 600) -> float:
    """SIGKILL the fit's process group once a batch of ``epoch`` has ended; return when (s since start)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        text = progress.read_text().split() if progress.exists() else []
        if len(text) == 2 and int(text[0]) == epoch:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(
            f"the fit ended (exit {proc.returncode}) before epoch {epoch} could be interrupted"
        )
    os.killpg(proc.pid, signal.SIGKILL)  # both DDP ranks: rank 1 is a child in the same group
    proc.wait()
    return time.monotonic() - start


def live_group_members(pgid: int, wait: float = 5.0) -> list[int]:
    """Processes of group ``pgid`` still running (zombies excluded) after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
            except (OSError, IndexError):
                continue  # ended meanwhile
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.1)


def compare_runs(straight: Path, resumed: Path) -> dict:
    """Epoch, step, max abs weight difference and best checkpoint of two runs' ``last.ckpt``."""
    import torch

    from test_resume import _best_state

    (a_path,), (b_path,) = straight.rglob("last.ckpt"), resumed.rglob("last.ckpt")
    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    same_keys = a["state_dict"].keys() == b["state_dict"].keys()
    diff = (
        max(
            (float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]),
            default=0.0,
        )
        if same_keys
        else float("inf")
    )
    return {
        "epoch": [a["epoch"], b["epoch"]],
        "global_step": [a["global_step"], b["global_step"]],
        "same_parameters": same_keys,
        "max_abs_diff": diff,
        "best": [_best_state(a_path), _best_state(b_path)],
        "best_files": [sorted(p.name for p in run.rglob("epoch=*.ckpt")) for run in (straight, resumed)],
    }


def ddp_soak(args: argparse.Namespace) -> dict:
    """Part (b): an uninterrupted DDP fit, then one killed and resumed ``--kills`` times; compare them."""
    import shutil

    import torch

    work = args.work / "ddp"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    store = simulated_store(args.work, "tiny")
    epochs = args.kills + 2  # kill i happens in epoch i; the last resume runs the final epochs
    config, progress = ddp_config(work, epochs), work / "progress"

    start = time.monotonic()
    finish(start_fit(config, store, work / "straight"))
    straight_s = time.monotonic() - start

    kills = []
    for i in range(1, args.kills + 1):
        progress.unlink(missing_ok=True)
        extra = ("--ckpt_path", "last") if i > 1 else ()
        proc = start_fit(config, store, work / "killed", *extra, delay=args.delay)
        after = kill_mid_epoch(proc, progress, epoch=i)
        (last,) = (work / "killed").rglob("last.ckpt")
        kills.append(
            {
                "in_epoch": i,
                "at_batch": int(progress.read_text().split()[1]),
                "seconds_after_start": after,
                "last_ckpt_epoch": torch.load(last, map_location="cpu", weights_only=True)["epoch"],
                "survivors": live_group_members(proc.pid),
            }
        )
    finish(start_fit(config, store, work / "killed", "--ckpt_path", "last"))

    cmp = compare_runs(work / "straight", work / "killed")
    equal = (
        cmp["epoch"][0] == cmp["epoch"][1]
        and cmp["global_step"][0] == cmp["global_step"][1]
        and cmp["max_abs_diff"] <= 1e-6
        and cmp["best"][0][0] == cmp["best"][1][0]
        and abs(cmp["best"][0][1] - cmp["best"][1][1]) <= 1e-6
        and cmp["best_files"][0] == cmp["best_files"][1]
    )
    report = {
        "store": str(store),
        "epochs": epochs,
        "straight_seconds": straight_s,
        "kills": kills,
        "compare": cmp,
        "equal": equal,
    }
    print(f"DDP soak (2 CPU processes, gloo, {epochs} epochs, {args.kills} kills):")
    for k in kills:
        print(
            f"  killed in epoch {k['in_epoch']} after batch {k['at_batch']}: last.ckpt at epoch "
            f"{k['last_ckpt_epoch']}, processes left: {k['survivors'] or 'none'}"
        )
    print(
        f"  epoch {cmp['epoch']}, step {cmp['global_step']}, weights max |diff| {cmp['max_abs_diff']:.3g}, "
        f"best {cmp['best'][0]} vs {cmp['best'][1]}"
    )
    print(f"  resumed run equal to the uninterrupted one: {equal}")
    return report


# -------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("loader", "ddp", "both"), default="both")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/brainit-soak"), help="stores and runs (reused)"
    )
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON reports go")
    parser.add_argument(
        "--preset", default="full", help="simulated subject of the loader part (default: full)"
    )
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (loader part)")
    parser.add_argument("--batches", type=int, default=10000, help="batches to read (loader part)")
    parser.add_argument("--every", type=int, default=100, help="probe memory and handles every N batches")
    parser.add_argument("--hash-batches", type=int, default=50, help="first K batches hashed in both runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--voxels-per-sample", type=int, default=15000)
    parser.add_argument("--image-sizes", type=int, nargs="*", default=[112], help="stimuli read per batch")
    parser.add_argument("--image-size", type=int, default=64, help="simulated stimulus side (pixels)")
    parser.add_argument("--seed", type=int, default=0, help="the DataModule's seed")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL + resume cycles (DDP part)")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per batch of a run to kill")
    parser.add_argument("--iterate", help=argparse.SUPPRESS)  # internal: one loader run in this process
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.iterate:
        print(json.dumps(iterate(args, args.iterate, args.batches, args.every)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    parts = {"loader": loader_soak, "ddp": ddp_soak}
    sizes = {"loader": f"w{args.workers}_b{args.batches}", "ddp": f"k{args.kills}"}
    for name in ("loader", "ddp") if args.part == "both" else (args.part,):
        report = parts[name](args)
        out = args.results / f"soak_{name}_{sizes[name]}.json"
        out.write_text(json.dumps(report, indent=1))
        print(f"  → {out}", flush=True)


if __name__ == "__main__":
    main()
