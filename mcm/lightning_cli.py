"""``mcm fit|validate|test|predict -c experiments/X.yaml``: LightningCLI in omegaconf mode.

Models and data modules are chosen by ``class_path`` in the YAML (``mcm.MCMModule``,
``mcm.base_pretraining.BasePretrainModule``, ``datamodules.ShardDataModule`` ...); the
resolved config is saved next to every run.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class MCMCLI(LightningCLI):
    pass


def run_lightning_cli(argv: list[str]) -> MCMCLI:
    return MCMCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=argv, seed_everything_default=0,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
    )
