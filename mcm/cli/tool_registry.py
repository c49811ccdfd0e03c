"""Where subcommands from other modules attach to the ``mcm`` parser (kept apart so each stays small)."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction, data: argparse._SubParsersAction) -> None:
    for modname in ("datamodules.pack", "mcm.training.export", "mcm.cli.demo", "mcm.evaluation.evaluate", "mcm.cli.sample_command"):
        try:
            mod = __import__(modname, fromlist=["add_command"])
        except ModuleNotFoundError as e:
            if e.name == modname:  # not written yet
                continue
            raise
        mod.add_command(data if modname.startswith("datamodules") else sub)
