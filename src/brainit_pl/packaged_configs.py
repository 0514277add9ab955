"""``brainit-pl config list | show NAME | copy NAME [DEST]``: the configs that ship with the package.

The checkout's ``configs/`` folder is installed as ``brainit_pl/configs`` (a wheel carries it), so every
config is at hand without a checkout. ``--config NAME`` of ``brainit-pl fit | validate | test | predict``
takes such a name (``subj01``, ``sim/bit_tiny``; also ``configs/subj01.yaml``) where no file of that path
exists. Paths in a config (``data.store: data/store``, ...) are relative to the folder the command runs in.
"""

from __future__ import annotations

import argparse
import shutil
from importlib.resources import files
from pathlib import Path

from brainit_pl.errors import BrainITError, require

SUFFIX = ".yaml"


def configs_root() -> Path:
    """The installed ``brainit_pl/configs`` folder (a plain folder: the package is never zipped)."""
    root = files("brainit_pl").joinpath("configs")
    require(isinstance(root, Path) and root.is_dir(), f"the packaged configs are missing ({root})")
    return root


def config_names() -> list[str]:
    """Every packaged config, as the name ``--config`` takes (``subj01``, ``sim/bit_tiny``), sorted."""
    root = configs_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob(f"*{SUFFIX}"))


def find_config(name: str) -> Path | None:
    """The packaged config called ``name`` (``subj01``, ``subj01.yaml``, ``configs/subj01.yaml``), or None."""
    key = name.removeprefix("./").removeprefix("configs/").removesuffix(SUFFIX)
    return configs_root() / f"{key}{SUFFIX}" if key in config_names() else None


def packaged_config(name: str) -> Path:
    """:func:`find_config`, or a one-line error that lists where to look."""
    path = find_config(name)
    if path is None:
        raise BrainITError(f"no packaged config {name!r} (`brainit-pl config list` shows them)")
    return path


def resolve_config_arg(value: str) -> str:
    """A ``--config`` value as LightningCLI should get it: an existing file as is, a packaged config's name
    as its path, inline YAML (``{trainer: {max_epochs: 1}}``) as is; anything else is a one-line error."""
    if Path(value).is_file() or _inline_yaml(value):
        return value
    path = find_config(value)
    if path is None:
        raise BrainITError(
            f"--config {value}: no such file, and no packaged config of that name (`brainit-pl config list`)"
        )
    return str(path)


def _inline_yaml(value: str) -> bool:
    return value.lstrip().startswith("{") or ": " in value or "\n" in value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl config``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,show,copy}")
    sub.add_parser("list", help="the names of the packaged configs")
    show = sub.add_parser("show", help="print a packaged config")
    show.add_argument("name", help="a name from `brainit-pl config list` (e.g. subj01, sim/bit_tiny)")
    copy = sub.add_parser("copy", help="copy a packaged config to edit it")
    copy.add_argument("name", help="a name from `brainit-pl config list`")
    copy.add_argument("dest", nargs="?", type=Path, default=Path("."), help="a file or an existing folder")
    copy.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl config`` with parsed ``args``."""
    if args.action == "list":
        print("\n".join(config_names()))
    elif args.action == "show":
        print(packaged_config(args.name).read_text(), end="")
    else:
        print(copy_config(args.name, args.dest, overwrite=args.overwrite))
    return 0


def copy_config(name: str, dest: Path, overwrite: bool = False) -> Path:
    """Copy packaged config ``name`` to ``dest`` (a file, or a folder that gets ``<basename>.yaml``)."""
    source = packaged_config(name)
    target = dest / source.name if dest.is_dir() else dest
    require(overwrite or not target.exists(), f"{target} exists (--overwrite replaces it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
