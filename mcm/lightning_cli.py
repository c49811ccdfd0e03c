"""``mcm fit|validate|test|predict -c experiments/X.yaml``: LightningCLI in omegaconf mode.

Models and data modules are chosen by ``class_path`` in the YAML (``mcm.MCMModule``,
``mcm.base_pretraining.BasePretrainModule``, ``datamodules.ShardDataModule`` ...); the
resolved config is saved next to every run, and into the wandb run when wandb logs it.
Interpolations such as ``modalities: ${data.init_args.modalities}`` are resolved after the
command line is applied (jsonargparse's ``omegaconf+`` mode), so
``--data.init_args.modalities.segmentation.num_classes 6`` reaches the model too.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


class SaveConfigToRun(SaveConfigCallback):
    """Also keeps the resolved config with the wandb run (Lightning calls this on rank zero only).

    ``<run>/files/lightning_config.yaml`` is per run (``<log_dir>/config.yaml`` is shared by runs
    with the same ``save_dir``), and the trainer settings join the model/data hyperparameters in
    the run's config.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                text = self.parser.dump(self.config, skip_none=False)
                Path(lg.experiment.dir, "lightning_config.yaml").write_text(text)
                cfg = yaml.safe_load(text)
                lg.log_hyperparams({k: cfg[k] for k in ("trainer", "seed_everything", "ckpt_path") if k in cfg})


class MCMCLI(LightningCLI):
    pass


def run_lightning_cli(argv: list[str]) -> MCMCLI:
    # omegaconf+ resolves interpolations on the final config (command line included); relative
    # paths keep the YAMLs' ``${data.init_args.modalities}`` (written for the subcommand's root) valid
    from jsonargparse import set_parsing_settings

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return MCMCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=argv, seed_everything_default=0,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_callback=SaveConfigToRun, save_config_kwargs={"overwrite": True},
    )
