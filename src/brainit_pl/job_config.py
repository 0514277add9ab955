"""The argparse side of the project jobs: help texts, one-line errors, and options from YAML.

Every job (``brainit-pl reconstruct``, ``demo``, ...) takes, besides its own options:

* ``--config JOB.yaml`` (repeatable, later files win): its options as YAML keys, spelt as on the command
  line or with underscores (``n-images: 10`` or ``n_images: 10``). OmegaConf reads it, so values may
  interpolate others (``store: ${out}/store``) and environment variables (``${oc.env:HOME}``);
* ``--set KEY=VALUE ...``: a dot-list over the files (``--set seed=1 limit=4``);
* ``--print-config``: print the options the job would run with (keys with underscores), as YAML a later
  ``--config`` reads back, and stop.

The command line's own options win over both (``brainit-pl demo --config demo.yaml --seed 3``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from brainit_pl.errors import BrainITError

CONFIG_DESTS = ("config", "set", "print_config")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; every option with a default says ``(default: X)`` once.

    An option whose help already says what its default is (``(default: all found)``) is left alone, as is
    one without a default (None, or a flag that is off).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or text == argparse.SUPPRESS
        ):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: MESSAGE``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and ``--print-config`` (see the module docstring)."""
    group = parser.add_argument_group("options from YAML")
    group.add_argument(
        "--config",
        type=Path,
        action="append",
        metavar="JOB.yaml",
        help="read options from a YAML file (OmegaConf; repeatable, later files win; keys as the options, "
        "e.g. `seed: 1`); the command line's options win over it",
    )
    group.add_argument(
        "--set", nargs="+", action="extend", metavar="KEY=VALUE", help="options as a dot-list, over --config"
    )
    group.add_argument(
        "--print-config", action="store_true", help="print the options as YAML (a --config file) and stop"
    )


def apply_job_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Make the values of ``argv``'s ``--config`` files and ``--set`` pairs ``parser``'s defaults.

    An option they set is no longer required on the command line. Unknown keys, unreadable files and
    failed interpolations are a :class:`BrainITError`.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path, action="append", default=[])
    pre.add_argument("--set", nargs="+", action="extend", default=[])
    known, _ = pre.parse_known_args(list(argv))
    if not known.config and not known.set:
        return
    values = _load(known.config, known.set)
    actions = {a.dest: a for a in parser._actions if a.dest not in (*CONFIG_DESTS, "help")}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise BrainITError(f"--config/--set: unknown option(s) {', '.join(unknown)} of {parser.prog}")
    for dest in values:
        actions[dest].required = False
    for group in parser._mutually_exclusive_groups:  # one of them set: the group is satisfied
        group.required = group.required and not any(a.dest in values for a in group._group_actions)
    parser.set_defaults(**values)


def _load(files: list[Path], dotlist: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for path in files:
        if not path.is_file():
            raise BrainITError(f"--config {path}: no such file")
    try:
        merged = OmegaConf.merge(*(OmegaConf.load(p) for p in files), OmegaConf.from_dotlist(dotlist))
        values = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, ValueError) as err:
        raise BrainITError(f"--config/--set: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise BrainITError("--config: expected a mapping of option names to values")
    return values


def printable(args: argparse.Namespace) -> str:
    """``args`` as the YAML ``--print-config`` shows (paths as strings)."""
    from omegaconf import OmegaConf

    plain = json.loads(json.dumps(vars(args), default=str))
    return OmegaConf.to_yaml({k: v for k, v in plain.items() if k not in CONFIG_DESTS})


def pop_config_options(args: argparse.Namespace) -> bool:
    """Drop ``--config``/``--set``/``--print-config`` from ``args`` (the jobs take their args as keywords);
    True when ``--print-config`` printed the options, so the job must not run."""
    if args.print_config:
        sys.stdout.write(printable(args))
    printed = args.print_config
    for dest in CONFIG_DESTS:
        delattr(args, dest)
    return printed
