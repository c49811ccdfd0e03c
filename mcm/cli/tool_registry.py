"""Where subcommands from other modules attach to the ``mcm`` parser (kept apart so each stays small)."""
from __future__ import annotations

import argparse
import importlib

#: modules with an ``add_command(subparsers)``; those of DATA_COMMANDS attach under ``mcm data``
COMMAND_MODULES = ("datamodules.pack", "mcm.training.encode", "mcm.training.export", "mcm.cli.demo",
                   "mcm.evaluation.evaluate", "mcm.cli.sample_command", "mcm.cli.app")
DATA_COMMANDS = ("datamodules.pack", "mcm.training.encode")


def add_commands(sub: argparse._SubParsersAction, data: argparse._SubParsersAction) -> None:
    # every module is part of the package: a missing one is a broken install, never a silently absent command
    for modname in COMMAND_MODULES:
        importlib.import_module(modname).add_command(data if modname in DATA_COMMANDS else sub)
