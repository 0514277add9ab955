"""``brainit-pl weights``: every pretrained file the real configs read, present or missing, and how to get it.

  brainit-pl weights                      # the weights folder ($BRAINIT_WEIGHTS), HF cache, torch hub
  brainit-pl weights --weights-dir /data/weights --missing

Each file is looked for as the runs look for it (:func:`~brainit_pl.backbones.weights.find_weights`): the
weights folder, then the Hugging Face cache (offline), then torch hub's checkpoint folder. A missing file
comes with the command that downloads it where it will be found (``huggingface-cli download ...`` or
``wget -P <torch hub>/checkpoints URL``). Exit status 1 when a file is missing (``--missing``: list only those).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl weights``."""
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="the weights folder (default: $BRAINIT_WEIGHTS or ~/.cache/brainit-pl/weights)",
    )
    parser.add_argument("--missing", action="store_true", help="list only the files not found")


def inventory(weights_dir: str | Path | None = None) -> list[dict[str, str | int | None]]:
    """One row per :data:`~brainit_pl.backbones.weights.WEIGHT_FILES` entry: ``key``, ``what``,
    ``used_by``, ``path`` / ``where`` / ``bytes`` (``None`` when missing) and ``fetch`` (the download command)."""
    rows = []
    from brainit_pl.backbones.weights import WEIGHT_FILES, find_weights  # torch: not for --help

    for key, spec in WEIGHT_FILES.items():
        found = find_weights(key, weights_dir)
        path, where = found if found is not None else (None, None)
        rows.append(
            {
                "key": key,
                "what": spec.what,
                "used_by": spec.used_by,
                "size": spec.size,
                "path": None if path is None else str(path),
                "where": where,
                "bytes": None if path is None else _size(path),
                "fetch": spec.fetch_command(),
            }
        )
    return rows


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rows(rows: list[dict], weights_dir: str | Path | None = None) -> str:
    """The listing ``brainit-pl weights`` prints."""
    from brainit_pl.backbones.weights import weights_folder

    lines = [f"weights folder: {weights_folder(weights_dir)}", ""]
    for row in rows:
        found = row["path"] is not None
        state = f"found in {row['where']}, {_human(row['bytes'])}" if found else f"MISSING ({row['size']})"
        lines += [f"{row['key']}: {state}", f"  {row['what']}", f"  used by: {row['used_by']}"]
        lines.append(f"  {row['path']}" if found else f"  fetch: {row['fetch']}")
    n_missing = sum(row["path"] is None for row in rows)
    lines += ["", f"{len(rows) - n_missing} of {len(rows)} files found"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the listing; exit status 1 when a file is missing."""
    rows = inventory(args.weights_dir)
    shown = [row for row in rows if row["path"] is None] if args.missing else rows
    print(format_rows(shown, args.weights_dir))
    return int(any(row["path"] is None for row in rows))
