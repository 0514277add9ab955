"""LightningCLI for ``brainit-pl fit | validate | test | predict``.

The model is chosen in the config (``model.class_path``); the data is always the
:class:`~brainit_pl.data.datamodule.NSDDataModule`. Numbers the data decides are linked from the
DataModule into the model, never typed twice: ``data.n_voxels`` → ``model.init_args.n_voxels``.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from brainit_pl.data.datamodule import NSDDataModule
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import checkpoint_guard, checkpoints_trusted, load_checkpoint, trusting_checkpoints

log = logging.getLogger(__name__)


class BrainITCLI(LightningCLI):
    """LightningCLI with the NSDDataModule fixed and any LightningModule subclass as the model."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        """A bad option or value raises jsonargparse's ``ArgumentError`` (the caller prints one line) instead
        of printing the whole usage and exiting."""
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        raising = {"exit_on_error": False}
        # Lightning's bar (elapsed < ETA per epoch) on a terminal; none in a log file or CI, where every
        # refresh would be a line. A config's or the command line's trainer.enable_progress_bar wins.
        kwargs.setdefault("trainer_defaults", {"enable_progress_bar": sys.stderr.isatty()})
        super().__init__(
            model_class=LightningModule,
            datamodule_class=NSDDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            args=args,
            parser_kwargs={
                "description": "brainit-pl: train and evaluate on a prepared NSD store.",
                **raising,
                **{name: dict(raising) for name in self.subcommands()},
            },
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning rebuilds the model from a checkpoint's hyperparameters, over the config: say what changed.

        (A config value silently replaced by the checkpoint's would otherwise look like a bug in the run.)
        Lightning reads the file with ``weights_only=True``: under :func:`checkpoint_guard` a file that needs
        more is one line naming it, not a traceback.
        """
        self._resolve_last()
        before = self._model_args()
        ckpt_path = self._subcommand_config().get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            self._check_ckpt_class(ckpt_path)
        with trusting_checkpoints(self._trusted()):
            try:
                with checkpoint_guard(ckpt_path):
                    super()._parse_ckpt_path()
            except BrainITError:
                if not self._trusted():
                    raise
                log.warning("%s: hyperparameters not read (the file needs full unpickling)", ckpt_path)
        after = self._model_args()
        changed = [  # n_voxels is linked from the data later: not the user's
            f"{k}: {before[k]!r} -> {after[k]!r}"
            for k in sorted(before)
            if k in after and before[k] != after[k] and k != "n_voxels"
        ]
        if changed:
            log.warning(
                "the model is built from the checkpoint's hyperparameters, which replace the config's: %s",
                "; ".join(changed),
            )

    def _check_ckpt_class(self, ckpt_path: str) -> None:
        """Refuse, before anything is built, a ``--ckpt_path`` that cannot be read (truncated, not a checkpoint)
        or that holds another module class than the config's ``model.class_path`` (Lightning would otherwise
        build the checkpoint's class and train it under the other config's name)."""
        try:
            with trusting_checkpoints(self._trusted()):
                ckpt = load_checkpoint(ckpt_path, mmap=True)
        except BrainITError:
            if not self._trusted():
                raise
            return  # the trusted read below says the rest
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise BrainITError(
                f"--ckpt_path {ckpt_path} is not a readable checkpoint ({type(err).__name__}: {err}); it is "
                "truncated or damaged: pass another one (an earlier epoch's, or none to start over)"
            ) from err
        saved = ckpt.get("hyper_parameters", {}).get("_class_path") if isinstance(ckpt, dict) else None
        model = self._subcommand_config().get("model")
        wanted = getattr(model, "class_path", None)
        require(
            saved is None or wanted is None or saved == wanted,
            f"--ckpt_path {ckpt_path} holds a {saved} but the config's model is a {wanted}; pass a checkpoint "
            "of that model, or the config it was trained with",
        )

    def _resolve_last(self) -> None:
        """``--ckpt_path last``: the newest ``checkpoints/last.ckpt`` under ``trainer.default_root_dir``.

        Lightning looks only in the folders of *this* run's callbacks, which are a new ``version_N``, and
        starts from scratch with a warning when it finds nothing there; here a missing one is an error.
        """
        sub = self.config.get("subcommand")
        config = self._subcommand_config()
        if not sub or config.get("ckpt_path") != "last":
            return
        trainer = config.get("trainer")
        root = Path((trainer.get("default_root_dir") if trainer is not None else None) or os.getcwd())
        found = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: (p.stat().st_mtime, str(p)))
        require(
            bool(found),
            f"--ckpt_path last: no checkpoints/last.ckpt under {root} (trainer.default_root_dir), so nothing "
            "to resume; pass the interrupted run's --trainer.default_root_dir, or start without --ckpt_path",
        )
        self.config[f"{sub}.ckpt_path"] = str(found[-1])
        log.info("resuming from %s", found[-1])

    def before_fit(self) -> None:
        """Resuming a run of the same ``default_root_dir``: its checkpoint callbacks keep writing into the
        interrupted run's folder, so they get back its best score and best/last files (Lightning restores
        a ModelCheckpoint's state only when its folder is the same; the logger's new ``version_N`` would
        otherwise be a new folder and a second, independent "best")."""
        ckpt_path = self._subcommand_config().get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        root = Path(self.trainer.default_root_dir).resolve()
        if root not in Path(ckpt_path).resolve().parents:
            return  # continuing into another folder: a new run that starts from these weights
        states = load_checkpoint(ckpt_path, mmap=True).get("callbacks", {})
        for callback in self.trainer.checkpoint_callbacks:
            state = states.get(getattr(callback, "state_key", None))
            if getattr(callback, "dirpath", "") is None and isinstance(state, dict) and state.get("dirpath"):
                callback.dirpath = state["dirpath"]

    def _subcommand_config(self) -> Any:
        sub = self.config.get("subcommand")
        return self.config.get(sub, {}) if sub else {}

    def _trusted(self) -> bool:
        return bool(self._subcommand_config().get("trust_checkpoint"))

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``fit``/``test``/...: ``--ckpt_path`` is read with ``weights_only`` and the allow-list of
        :mod:`brainit_pl.files` (``--trust_checkpoint``: full unpickling)."""
        with (
            trusting_checkpoints(self._trusted()),
            checkpoint_guard(self._subcommand_config().get("ckpt_path")),
        ):
            super()._run_subcommand(subcommand)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            kwargs["weights_only"] = not checkpoints_trusted()
        return kwargs

    def _model_args(self) -> dict[str, Any]:
        sub = self.config.get("subcommand")
        model = self.config.get(sub, {}).get("model") if sub else None
        args = getattr(model, "init_args", None) if model is not None else None
        return dict(vars(args)) if args is not None else {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--trust_checkpoint",
            action=ActionYesNo,
            default=False,
            help="read --ckpt_path with full unpickling (only for a file whose source you trust); without it "
            "a checkpoint holding anything but tensors and plain values is refused (--weights_only is set by this)",
        )
        parser.link_arguments("data.n_voxels", "model.init_args.n_voxels", apply_on="instantiate")
