"""LightningCLI for ``brainit-pl fit | validate | test | predict``.

The model is chosen in the config (``model.class_path``); the data is always the
:class:`~brainit_pl.data.datamodule.NSDDataModule`. Numbers the data decides are linked from the
DataModule into the model, never typed twice: ``data.n_voxels`` → ``model.init_args.n_voxels``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from brainit_pl.data.datamodule import NSDDataModule


class BrainITCLI(LightningCLI):
    """LightningCLI with the NSDDataModule fixed and any LightningModule subclass as the model."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        super().__init__(
            model_class=LightningModule,
            datamodule_class=NSDDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            args=args,
            parser_kwargs={"description": "brainit-pl: train and evaluate on a prepared NSD store."},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_voxels", "model.init_args.n_voxels", apply_on="instantiate")
