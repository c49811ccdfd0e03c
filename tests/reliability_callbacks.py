"""Callbacks that ``test_reliability.py`` puts into real ``mcm fit`` subprocesses (tests/ on PYTHONPATH,
``MCM_ALLOW_CLASS_PREFIXES=reliability_callbacks`` since they are outside mcm's class allow-list).

* ``StepLog``: appends ``<pid> <rank> <global_step>`` after every training step (so a test sees how
  far a run got and where a resumed run started).
* ``FailOnRank``: raises on one rank at one step, as a crashing data worker or OOM would.
"""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import Callback


class StepLog(Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {trainer.global_rank} {trainer.global_step}\n")


class FailOnRank(Callback):
    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")
