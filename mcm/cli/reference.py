"""The CLI reference as Markdown, generated from the parsers themselves (the docs site's "CLI reference" page).

    python -m mcm.cli.reference > cli.md

Every ``mcm`` tool command's ``--help``, as argparse prints it; the LightningCLI commands (``fit``,
``validate``, ``test``, ``predict``) with the options this project adds and a pointer to ``mcm fit --help``,
which lists every trainer, model and data option of a config.
"""
from __future__ import annotations

import argparse

LIGHTNING_NOTE = """`mcm fit|validate|test|predict -c experiments/X.yaml` run through LightningCLI: every key of the
config can be set on the command line (`--trainer.max_steps 100`, `--model.init_args.lr 1e-4`,
`--data.init_args.train_shards "shards/train-*.tar"`), and `mcm fit -c X.yaml --help` lists them all for
the config's classes. This project adds:

- `--judges.segmenter DIR`, `--judges.label_map FILE`, `--judges.depth_model DIR` (and `depth_kind`,
  `seg_judge`, `depth_judge`, `feature_judge`): the alignment callback's local judges; set on the config's
  `AlignmentCallback`, or one is added with them;
- `--allow-any-class`: lift the allow-list of modules a config may import classes from
  (`MCM_ALLOW_CLASS_PREFIXES=my_pkg` adds a trusted package instead);
- `precision: null` (the templates' default) becomes `bf16-mixed` on a GPU and `32-true` on the CPU;
  `ModelCheckpoint` (keeping `last.ckpt`), `RNGState` and `CheckpointOnStop` are added when a config's
  callbacks lack them.
"""


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    """``(command path, parser)`` of every sub-command, depth first, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.add_help:  # the Lightning commands are listed without argparse help
                    yield [*path, name], sub
                yield from _walk(sub, [*path, name])


def markdown() -> str:
    import os

    from mcm.cli.tool_commands import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width: the page should not depend on it
    parser = build_parser()
    parts = ["## `mcm fit`, `validate`, `test`, `predict`\n", LIGHTNING_NOTE]
    for path, sub in _walk(parser, ["mcm"]):
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue  # a group such as `mcm data`: its commands follow
        sub.prog = " ".join(path)
        parts += [f"## `{' '.join(path)}`\n", "```text", sub.format_help().rstrip(), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown())
