"""Non-Lightning subcommands: ``mcm data shapes|pack|inspect``, ``mcm export``, ``mcm evaluate``, ``mcm demo``."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger("mcm")


def _data_shapes(a: argparse.Namespace) -> int:
    import time

    from datamodules.shapes import write_shapes_shards

    t = time.time()
    written = write_shapes_shards(a.out, a.train, a.val, size=a.size, seed=a.seed, shard_size=a.shard_size,
                                  workers=a.workers, test=a.test)
    log.info("shapes: %s in %s (%.1f s)", ", ".join(f"{len(v)} {k} shards" for k, v in written.items()), a.out,
             time.time() - t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcm", description="Control frozen diffusion models with spatial modalities. "
                                "Training runs: mcm fit|validate|test|predict -c experiments/X.yaml")
    sub = p.add_subparsers(dest="command", required=True)
    # LightningCLI runs these (mcm.cli.main dispatches before argparse); listed here so `mcm --help` shows them
    for name, what in (("fit", "train a model (MCM, ControlNet, T2I-Adapter, a base) from a config"),
                       ("validate", "validation loss of a checkpoint over the whole validation split"),
                       ("test", "test loss of a checkpoint over the whole test split"),
                       ("predict", "sample held-out conditions with a checkpoint: PNGs and labelled grids")):
        sub.add_parser(name, add_help=False, help=f"{what}: mcm {name} -c experiments/X.yaml [--ckpt_path CKPT] "
                       f"(LightningCLI; `mcm {name} --help` lists every option)")

    data = sub.add_parser("data", help="make, pack and inspect webdataset shards").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("shapes", help="generate the embedded shapes dataset as shards")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, required=True, help="number of training images")
    s.add_argument("--val", type=int, required=True, help="number of validation images (every choice is made on them)")
    s.add_argument("--test", type=int, default=0, help="number of test images, from their own seed stream: the "
                   "split reported figures are measured on (default 0: none)")
    s.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.set_defaults(func=_data_shapes)

    from mcm.cli import tool_registry

    tool_registry.add_commands(sub, data)
    return p


def run_tool_command(argv: list[str]) -> int:
    from mcm.cli import LIGHTNING_COMMANDS

    if argv and argv[0] in LIGHTNING_COMMANDS:
        from mcm.cli.lightning_cli import run_lightning_cli

        run_lightning_cli(list(argv))
        return 0
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
