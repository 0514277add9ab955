"""The ``brainit-pl`` command.

Two kinds of subcommands share one entry point:

* Lightning's ``fit``, ``validate``, ``test`` and ``predict`` go to :class:`BrainITCLI`
  (a :class:`~lightning.pytorch.cli.LightningCLI`): the typed constructor signatures of the
  LightningModule and :class:`~brainit_pl.data.datamodule.NSDDataModule` are the config schema.
* Project jobs (``simulate``, ``prepare``, ``evaluate``, ...) are plain argparse subcommands. Each lives
  in its own module, which exposes ``add_arguments(parser)`` and ``run(args)``; the module is imported
  only when its subcommand runs, so ``brainit-pl --help`` stays fast.

A :class:`~brainit_pl.errors.BrainITError` anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from brainit_pl import __version__
from brainit_pl.errors import BrainITError
from brainit_pl.files import trusting_checkpoints

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
}

# The jobs that read checkpoints a user passes: they take --trust-checkpoint (see brainit_pl.files).
CHECKPOINT_COMMANDS = ("cluster", "synthesize-fmri", "reconstruct", "transfer", "transfer-demo")
TRUST_HELP = (
    "read checkpoints with full unpickling: without it a checkpoint holding anything but tensors and plain "
    "values is refused, since unpickling it could run code. Only for files whose source you trust"
)

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI; --config configs/<name>.yaml)",
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
        "  brainit-pl fit --config configs/subj01.yaml",
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


def run_project_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for project job ``name`` and run it; user errors become one line, exit 2."""
    module_name, summary = PROJECT_COMMANDS[name]
    module = importlib.import_module(module_name)
    doc = (module.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog=f"brainit-pl {name}",
        description=doc or summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    if name in CHECKPOINT_COMMANDS:
        parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = parser.parse_args(list(argv))
    trust = vars(args).pop("trust_checkpoint", False)  # jobs pass their args on as keywords: not theirs
    try:
        with trusting_checkpoints(trust):
            status = module.run(args)
    except BrainITError as err:
        return _fail(f"brainit-pl {name}", str(err))
    except KeyboardInterrupt:
        return _fail(f"brainit-pl {name}", "interrupted (nothing half-written was kept)")
    return int(status or 0)


def run_lightning(argv: Sequence[str]) -> int:
    """Run a LightningCLI subcommand (fit / validate / test / predict)."""
    from brainit_pl.lit.cli import BrainITCLI

    # LightningCLI reads sys.argv, and Lightning's DDP launcher re-runs sys.argv in each child process:
    # both must see this command, also when main() is called from Python with its own argv.
    argv = ["--trust_checkpoint" if a == "--trust-checkpoint" else a for a in argv]  # either spelling
    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "brainit-pl", *argv]
    try:
        BrainITCLI()
    except BrainITError as err:
        return _fail(f"brainit-pl {argv[0]}", str(err))
    except (ValueError, TypeError) as err:
        # jsonargparse wraps an error raised while instantiating the model (e.g. a clusters file that does
        # not fit the store) in its own ValueError: unwrap ours.
        cause = _brainit_cause(err)
        if cause is None:
            raise
        return _fail(f"brainit-pl {argv[0]}", str(cause))
    finally:
        sys.argv = saved
    return 0


def _brainit_cause(err: BaseException) -> BrainITError | None:
    """The BrainITError in ``err``'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BrainITError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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
