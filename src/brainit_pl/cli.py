"""The ``brainit-pl`` command.

Two kinds of subcommands share one entry point:

* Lightning's ``fit``, ``validate``, ``test`` and ``predict`` go to :class:`BrainITCLI`
  (a :class:`~lightning.pytorch.cli.LightningCLI`): the typed constructor signatures of the
  LightningModule and :class:`~brainit_pl.data.datamodule.NSDDataModule` are the config schema.
  ``--config`` also takes the name of a packaged config (``brainit-pl config list``).
* Project jobs (``simulate``, ``prepare``, ``evaluate``, ...) are plain argparse subcommands. Each lives
  in its own module, which exposes ``add_arguments(parser)`` and ``run(args)``; the module is imported
  only when its subcommand runs, so ``brainit-pl --help`` stays fast. Every job also reads its options
  from ``--config JOB.yaml`` (OmegaConf: ``${...}`` interpolation) and ``--set KEY=VALUE`` dot-lists, with
  the command line's own options over both; ``--print-config`` prints the options it would run with.

A :class:`~brainit_pl.errors.BrainITError` anywhere, and any bad option, becomes one line on stderr and
exit status 2, and so does an I/O failure the user fixes outside brainit-pl (a full disk, a read-only output
folder): one line naming the file (:func:`~brainit_pl.errors.io_error_message`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

from brainit_pl import __version__, job_config
from brainit_pl.errors import BrainITError, hdf5_write_failed, io_error_message
from brainit_pl.files import trusting_checkpoints
from brainit_pl.packaged_configs import resolve_config_arg

# name -> (module, one-line summary). Each module defines add_arguments(parser) and run(args).
PROJECT_COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": (
        "brainit_pl.data.sim.simulate",
        "write a simulated NSD (raw NSD file layout + ground truth) from a known brain model",
    ),
    "prepare": (
        "brainit_pl.data.prepare",
        "read a raw NSD root (or MindEye2's release) into brainit-pl's streaming store",
    ),
    "extract-features": (
        "brainit_pl.features.extract",
        "write the CLIP patch-token cache of a store's images (batched, resumable)",
    ),
    "synthesize-fmri": (
        "brainit_pl.features.synthesize",
        "predict every voxel of every subject for an external image set with the trained encoder (resumable)",
    ),
    "cluster": (
        "brainit_pl.models.cluster_job",
        "V2C: cluster voxel embeddings (or coordinates) into functional clusters shared by all subjects",
    ),
    "reconstruct": (
        "brainit_pl.recon.reconstruct",
        "images from fMRI: low-level BIT → DIP, semantic BIT → unCLIP, optional SDXL refinement; scored",
    ),
    "demo": (
        "brainit_pl.workflows.demo",
        "the whole method on the simulated NSD (simulate → … → reconstruct), one report (make demo)",
    ),
    "evaluate": (
        "brainit_pl.metrics.evaluate",
        "score reconstructions against ground-truth images with the standard NSD metrics",
    ),
    "transfer": (
        "brainit_pl.workflows.transfer.run",
        "add a new subject to trained base models from little data (only its voxel embeddings learn)",
    ),
    "weights": (
        "brainit_pl.backbones.inventory",
        "list the pretrained files the real configs read: found where, or the command that fetches them",
    ),
    "transfer-demo": (
        "brainit_pl.workflows.transfer.demo",
        "hold out a simulated subject: transfer from 1 h vs scratch vs all data, one report (make transfer-1h)",
    ),
    "config": (
        "brainit_pl.packaged_configs",
        "list, show or copy the configs that ship with brainit-pl (`fit --config NAME` runs one)",
    ),
}

# The commands without --config/--set/--print-config (brainit_pl.job_config): `config` only shows files.
PLAIN_COMMANDS = ("config",)

# The jobs that read checkpoints a user passes: they take --trust-checkpoint (see brainit_pl.files).
CHECKPOINT_COMMANDS = ("cluster", "synthesize-fmri", "reconstruct", "transfer", "transfer-demo")
TRUST_HELP = (
    "read checkpoints with full unpickling: without it a checkpoint holding anything but tensors and plain "
    "values is refused, since unpickling it could run code. Only for files whose source you trust"
)

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI; --config NAME from `brainit-pl config list`, or a YAML file)",
    "validate": "run the validation loop on a checkpoint",
    "test": "reconstruct the shared test images and score them",
    "predict": "run prediction on a checkpoint",
}

log = logging.getLogger("brainit_pl")


def _top_help() -> str:
    lines = [
        "usage: brainit-pl <command> [options]",
        "",
        "Brain-IT (ICLR 2026): reconstruct the images a person saw from their fMRI (NSD), with PyTorch",
        "Lightning. Runs on real NSD files, MindEye2's preprocessed release, or a simulated NSD it writes.",
        "",
        "training and evaluation (LightningCLI; `brainit-pl fit --help` lists every option):",
    ]
    lines += [f"  {name:<18}{text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "project jobs (`brainit-pl <job> --help`):"]
    lines += [f"  {name:<18}{text}" for name, (_, text) in PROJECT_COMMANDS.items()]
    lines += [
        "",
        "typical use:",
        "  brainit-pl simulate --out sim/nsd --preset tiny",
        "  brainit-pl prepare --nsd-root sim/nsd --out sim/store",
        "  brainit-pl fit --config subj01",
        "",
        "options:",
        "  -h, --help   show this message and exit",
        "  --version    print the version and exit",
    ]
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is now (pytest and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _cli_logging() -> Iterator[None]:
    """While a command runs, show brainit-pl's INFO messages on stderr, once.

    Lightning configures its own loggers. Ours gets a handler of its own and does not propagate while the
    command runs: libraries that call ``logging.info`` configure the root logger, which would print every
    line twice. Afterwards the logger is as it was (tests capture through the root logger).
    """
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(os.environ.get("BRAINIT_LOG_LEVEL", "INFO"))
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.level, log.propagate = saved


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


RESUME_HINT = "; to continue the training, add --ckpt_path last"


def _user_failure(prog: str, err: BaseException, hint: str = "") -> int:
    """Exit status 2 and one line for a user error or a fixable I/O failure in ``err``'s chain; else re-raise.

    ``hint`` is added to a full disk's line. After HDF5 failed to write, releasing the broken file's handles crashes the interpreter: the process then
    ends here (its outputs were already cleaned on the way up: temporaries removed, locks released).
    """
    message = _user_message(err)
    if message is None:
        raise err
    status = _fail(prog, message + hint if message.startswith("disk full") else message)
    if any(hdf5_write_failed(e) for e in _chain(err)):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _user_message(err: BaseException) -> str | None:
    """The one line for ``err``: the first BrainITError or fixable OSError in its chain of causes."""
    for e in _chain(err):
        if isinstance(e, BrainITError):
            return _worker_message(str(e))
        if isinstance(e, OSError) and (message := io_error_message(e)) is not None:
            return message
    return None


def _worker_message(message: str) -> str:
    """A BrainITError re-raised by a DataLoader worker carries the worker's traceback: keep its last line."""
    if "Original Traceback" not in message:
        return message
    return message.strip().splitlines()[-1].split(f"{BrainITError.__name__}: ", 1)[-1]


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes and contexts, each once."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def run_project_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for project job ``name`` and run it; user errors become one line, exit 2."""
    module_name, summary = PROJECT_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _job_parser(name, module, summary)
    try:
        if name not in PLAIN_COMMANDS:
            job_config.apply_job_config(parser, argv)
        args = parser.parse_args(list(argv))
        if name not in PLAIN_COMMANDS and job_config.pop_config_options(args):
            return 0
        trust = vars(args).pop("trust_checkpoint", False)  # jobs pass their args on as keywords: not theirs
        with trusting_checkpoints(trust):
            status = module.run(args)
    except (BrainITError, OSError) as err:
        return _user_failure(f"brainit-pl {name}", err)
    except KeyboardInterrupt:
        return _fail(f"brainit-pl {name}", "interrupted (nothing half-written was kept)")
    return int(status or 0)


def _job_parser(name: str, module: ModuleType, summary: str) -> argparse.ArgumentParser:
    """The parser of job ``name``: its module's options, ``--trust-checkpoint`` and the YAML options."""
    parser = job_config.Parser(
        prog=f"brainit-pl {name}",
        description=(module.__doc__ or "").strip() or summary,
        formatter_class=job_config.HelpFormatter,
    )
    module.add_arguments(parser)
    if name in CHECKPOINT_COMMANDS:
        parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    if name not in PLAIN_COMMANDS:
        job_config.add_config_options(parser)
    return parser


def run_lightning(argv: Sequence[str]) -> int:
    """Run a LightningCLI subcommand (fit / validate / test / predict)."""
    prog = f"brainit-pl {argv[0]}"
    try:
        argv = _lightning_argv(argv)
    except BrainITError as err:
        return _fail(prog, str(err))
    from jsonargparse import ArgumentError

    from brainit_pl.lit.cli import BrainITCLI

    # LightningCLI reads sys.argv, and Lightning's DDP launcher re-runs sys.argv in each child process:
    # both must see this command, also when main() is called from Python with its own argv.
    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "brainit-pl", *argv]
    try:
        BrainITCLI()
    except ArgumentError as err:  # a bad option or value: one line, not jsonargparse's usage
        return _fail(prog, f"{_one_line(str(err))} (see --help)")
    except (BrainITError, OSError, ValueError, TypeError, RuntimeError) as err:
        # jsonargparse wraps an error raised while instantiating the model (e.g. a clusters file that does
        # not fit the store) in its own ValueError, Lightning some in a RuntimeError: unwrap ours.
        return _user_failure(prog, err, hint=RESUME_HINT if argv[0] == "fit" else "")
    finally:
        sys.argv = saved
    return 0


def _lightning_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--trust-checkpoint`` in either spelling and ``--config NAME`` as a packaged config's
    path (:func:`~brainit_pl.packaged_configs.resolve_config_arg`)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        option, eq, value = arg.partition("=")
        if eq and option == "--config":
            arg = f"--config={resolve_config_arg(value)}"
        elif i > 0 and argv[i - 1] in ("-c", "--config"):
            arg = resolve_config_arg(arg)
        out.append("--trust_checkpoint" if arg == "--trust-checkpoint" else arg)
    return out


def _one_line(message: str) -> str:
    """jsonargparse's multi-line message as one line: its head and, when it names one, the given value."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or ["invalid option"]
    head = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    given = [line for line in lines[2:] if line.startswith("Given value:")]
    return f"{head} ({given[0]})" if given else head


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``brainit-pl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _cli_logging():
        return _dispatch(argv)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        print(f"brainit-pl {__version__}")
        return 0
    name = argv[0]
    if name in PROJECT_COMMANDS:
        return run_project_command(name, argv[1:])
    if name in LIGHTNING_COMMANDS:
        return run_lightning(argv)
    return _fail(
        "brainit-pl",
        f"unknown command {name!r}; expected one of {', '.join([*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])}",
    )


if __name__ == "__main__":
    sys.exit(main())
