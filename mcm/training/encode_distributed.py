"""``mcm data encode --devices N [--num-nodes M]``: the same encoding on many devices and nodes, run by
Lightning (``Trainer.predict`` under DDP), so the launchers Lightning supports start it unchanged: its own
subprocess launcher for one machine, ``torchrun`` or SLURM's ``srun`` for several.

Each shard is one prediction item; the shards still to do (an output shard that exists is complete) are
listed identically on every rank and rank ``r`` of ``W`` encodes items ``r, r + W, ...`` with
:func:`mcm.training.encode.encode_shard`, writing its own output shards.  A shard's bytes depend on nothing
but the shard and the base (latents are the posterior mean, prediction draws are seeded by the sample key),
so any number of ranks writes exactly what one process writes; an interrupted run resumes by rerunning the
same command (complete shards skipped, partial ``.tmp`` ones redone).  Lightning's own distributed sampler
is off: it pads the last round by repeating items, which would encode a shard twice at once.
"""
from __future__ import annotations

import logging
from pathlib import Path
import lightning as L
import torch
from torch.utils.data import DataLoader

from mcm.training.encode import EncodeReport, EncodeSettings, encode_shard, pending_jobs, write_base_json

log = logging.getLogger(__name__)


class EncodeShards(L.LightningModule):
    """Encodes the shards of ``plan`` (``(src, dst)`` pairs, every rank the same list) that are not complete."""

    def __init__(self, base: torch.nn.Module, settings: EncodeSettings, record: dict, plan: list[tuple[str, Path]],
                 out: Path) -> None:
        super().__init__()
        self.base, self.settings, self.record, self.plan = base, settings, record, plan
        self.report = EncodeReport(str(out))
        self._counts = torch.zeros(3, dtype=torch.long)  # shards, samples, bad: this rank's

    def predict_dataloader(self) -> DataLoader:
        if self.trainer.is_global_zero:
            write_base_json(Path(self.report.out), self.record)
        pending = pending_jobs(self.plan, self.report)
        self.report.shards_done = [src for src, _ in pending]
        # every rank lists the pending shards before any rank writes one: the shares stay disjoint
        self.trainer.strategy.barrier("mcm-encode-plan")
        share = pending[self.trainer.global_rank::self.trainer.world_size]
        log.info("rank %d of %d: %d of %d pending shards", self.trainer.global_rank, self.trainer.world_size,
                 len(share), len(pending))
        return DataLoader(share, batch_size=None, shuffle=False, num_workers=0, collate_fn=lambda job: job)

    def predict_step(self, job: tuple[str, str], batch_idx: int) -> dict:
        src, dst = job
        r = encode_shard(self.base, self.settings, src, Path(dst))
        self._counts += torch.tensor([1, r["samples"], r["bad"]])
        return r

    def on_predict_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._counts.to(self.device), reduce_op="sum").cpu()
        _, self.report.samples, self.report.bad = (int(c) for c in counts)


def encode_distributed(base: torch.nn.Module, settings: EncodeSettings, record: dict, plan: list[tuple[str, Path]],
                       out: Path, devices: int, num_nodes: int = 1, accelerator: str = "auto") -> EncodeReport:
    """Run :class:`EncodeShards` under ``Trainer.predict`` with DDP on ``devices`` x ``num_nodes`` ranks.

    ``base`` is loaded on the CPU (Lightning moves it to each rank's device); ``record`` is its ``base.json``,
    already checked against ``out``.  Every rank returns the same totals.
    """
    module = EncodeShards(base, settings, record, plan, out)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp",
                        logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                        enable_model_summary=False, default_root_dir=str(out), inference_mode=True)
    trainer.predict(module, return_predictions=False)
    if trainer.is_global_zero:
        report = module.report
        log.log(logging.WARNING if report.bad else logging.INFO, "%s", report.summary())
    return module.report
