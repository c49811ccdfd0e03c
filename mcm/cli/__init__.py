"""The ``mcm`` command.

``mcm fit|validate|test|predict -c experiments/X.yaml`` run through LightningCLI (omegaconf
parser mode); ``mcm data ...``, ``mcm export``, ``mcm evaluate`` and ``mcm demo`` are plain
argparse commands dispatched here.
"""
from __future__ import annotations

import logging
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from mcm.cli.lightning_cli import run_lightning_cli

        run_lightning_cli(argv)
        return
    from mcm.cli.tool_commands import run_tool_command

    sys.exit(run_tool_command(argv))


if __name__ == "__main__":
    main()
