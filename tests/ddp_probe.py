"""A callback the DDP test (``test_training_runs.py``) adds to ``mcm fit`` with ``--trainer.callbacks+=``.

Each rank writes ``<out_dir>/rank<R>.json`` (what DDP's reducer holds, how many batches the
rank got and their sample keys, the validation keys it read and the validation loss it saw after
the cross-rank reduction) and ``<out_dir>/rank<R>.safetensors`` (its final MCM weights), so the
test can compare ranks after the subprocess ends.
"""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel


class DumpWeights(Callback):
    """Args:
        out_dir: where ``rank<R>.json`` and ``rank<R>.safetensors`` go.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.report: dict = {"batches": 0, "keys": [], "val_keys": [], "val_loss": []}

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        self.report["wrapped_in_ddp"] = isinstance(ddp, DistributedDataParallel)
        if self.report["wrapped_in_ddp"]:
            # every tensor DDP synchronises: the reducer's parameters (trainable, not ignored) and broadcast buffers
            held = [p for p in ddp.module.parameters() if p.requires_grad] + list(ddp._module_parameters)
            held += list(ddp.module.buffers())
            held_ids = {id(t) for t in held} | {t.data_ptr() for t in held}
            base = list(pl_module.base.frozen_parameters()) + list(pl_module.base.buffers())
            mcm = list(pl_module.mcm.parameters())
            self.report["base_tensors"] = len(base)
            self.report["base_in_ddp"] = sum(id(t) in held_ids or t.data_ptr() in held_ids for t in base)
            self.report["mcm_params"] = len(mcm)
            self.report["mcm_in_reducer"] = sum(id(p) in held_ids for p in mcm)
            self.report["reducer_params"] = len({id(p) for p in ddp.module.parameters() if p.requires_grad})
        self.report["num_training_batches"] = trainer.num_training_batches
        # the training draws of this rank: the timesteps and (the first values of) the noise of every step
        self.report["t"], self.report["noise"] = [], []
        fp = pl_module.forward_process
        sample_timesteps, add_noise = fp.sample_timesteps, fp.add_noise

        def record_t(*args, **kwargs):
            t = sample_timesteps(*args, **kwargs)
            if pl_module.training:
                self.report["t"].append(t.tolist())
            return t

        def record_noise(x0, noise, t):
            if pl_module.training:
                self.report["noise"].append(noise.flatten()[:8].tolist())
            return add_noise(x0, noise, t)

        fp.sample_timesteps, fp.add_noise = record_t, record_noise

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.report["batches"] += 1
        self.report["keys"] += list(batch["key"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if not trainer.sanity_checking:
            self.report["val_keys"] += list(batch["key"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.report["val_loss"].append(float(trainer.callback_metrics["val/loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        self.report.update(rank=rank, world_size=trainer.world_size, global_step=trainer.global_step)
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.mcm.state_dict().items()}
        save_file(state, str(self.out_dir / f"rank{rank}.safetensors"))
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(self.report))
