"""How long each ``brainit-pl ... --help`` takes: wall-clock seconds of a fresh process, best of --repeats.

Every command's help is meant to return in under 2 s (``--limit``): the project jobs import torch, Lightning
and the networks only where they run. ``fit``/``validate``/``test``/``predict`` are the exception: their
help is LightningCLI's, which imports Lightning and the model classes to list every option.

usage:
  python benchmarks/cli_help.py                 # every command, best of 3
  python benchmarks/cli_help.py --commands evaluate fit --repeats 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from brainit_pl.cli import LIGHTNING_COMMANDS, PROJECT_COMMANDS


def help_seconds(command: list[str], repeats: int) -> float:
    """Best wall-clock seconds of ``python -m brainit_pl.cli COMMAND --help`` over ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "brainit_pl.cli", *command, "--help"], check=True, capture_output=True
        )
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", nargs="+", help="commands to time (default: all, and the top level)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per command; the best counts (default: 3)"
    )
    parser.add_argument("--limit", type=float, default=2.0, help="seconds a help may take (default: 2)")
    args = parser.parse_args()
    commands = args.commands or ["", *LIGHTNING_COMMANDS, *PROJECT_COMMANDS]
    slow = []
    print(f"{'command':<20}{'seconds':>8}")
    for name in commands:
        seconds = help_seconds([name] if name else [], args.repeats)
        print(
            f"{name or '(top level)':<20}{seconds:>8.2f}{'  over the limit' if seconds > args.limit else ''}"
        )
        slow += [name] if seconds > args.limit and name not in LIGHTNING_COMMANDS else []
    return 1 if slow else 0  # LightningCLI's help is known to be over: reported, not a failure


if __name__ == "__main__":
    sys.exit(main())
