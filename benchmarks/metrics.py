"""Throughput of the full metric suite (image pairs per second, update + compute).

CPU: the tiny random twins (what the tests use). GPU, when CUDA is present: the real architectures with
random weights (same shapes and cost as the published networks; no weight files needed). Inputs are random
uint8 images at the sizes of a real run: 512² reconstructions, 425² ground truths, plus 300 embedding pairs
for retrieval.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/metrics.py [--n 64] [--batch-size 16] [--protocol mindeye2]
"""

from __future__ import annotations

import argparse
import time

import torch

from brainit_pl.metrics import build_eval_suite, summarize


def bench(device: torch.device, nets: str, n: int, batch_size: int, protocol: str) -> float:
    """Pairs per second for ``n`` pairs: all updates, the embeddings, and the final compute."""
    g = torch.Generator().manual_seed(0)
    recons = torch.randint(0, 256, (n, 3, 512, 512), dtype=torch.uint8, generator=g)
    gt = torch.randint(0, 256, (n, 3, 425, 425), dtype=torch.uint8, generator=g)
    brain, image = torch.randn(300, 768, generator=g), torch.randn(300, 768, generator=g)
    suite = build_eval_suite(protocol, nets=nets).to(device)
    suite.update(recons=recons[:2].to(device), gt=gt[:2].to(device))  # warm-up (lazy inits, cuDNN autotune)
    suite.reset()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        suite.update(recons=recons[i : i + batch_size].to(device), gt=gt[i : i + batch_size].to(device))
    suite.update(brain_embeds=brain.to(device), image_embeds=image.to(device))
    values = summarize(suite.compute())
    sync()
    elapsed = time.perf_counter() - start
    assert all(values[k] is not None for k in values), values
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64, help="image pairs on CPU [64]")
    parser.add_argument("--n-gpu", type=int, default=512, help="image pairs on GPU [512]")
    parser.add_argument("--batch-size", type=int, default=16, help="[16]")
    parser.add_argument("--protocol", default="mindeye2", choices=("mindeye2", "braindiffuser"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, protocol {args.protocol}")
    rate = bench(torch.device("cpu"), "tiny", args.n, args.batch_size, args.protocol)
    print(f"cpu  tiny twins                 {args.n:5d} pairs  {rate:8.1f} images/s")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        rate = bench(torch.device("cuda"), "random", args.n_gpu, 4 * args.batch_size, args.protocol)
        print(f"cuda real shapes, random weights {args.n_gpu:5d} pairs  {rate:8.1f} images/s  ({name})")
    else:
        print("cuda not available: GPU benchmark skipped")


if __name__ == "__main__":
    main()
