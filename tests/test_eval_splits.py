"""Exact evaluation splits (docs/reliability.md): val / test / predict read every sample of their shards exactly once
across ranks and workers (uneven shards, a last partial batch, no padding), their ``len`` is the number of
batches each rank gets, and validation draws fixed noise and timesteps per sample (seeded by its key): two
validations of the same weights give the same loss, whatever the batch size.

The real 2-process gloo run (3 uneven validation shards, the set of keys seen per rank, the DDP loss equal
to a single-process ``mcm validate`` of the same checkpoint) is in
``test_training_runs.py::test_ddp_two_ranks_identical_weights_base_outside_reducer``.
"""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules import ShardDataModule
from mcm.training.mcm_module import MCMModule
from shard_fixtures import plain_sample, write_tar

SIZES = (5, 7, 2)  # uneven, odd, one shard smaller than a batch
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8)
SEG = {"segmentation": {"num_classes": 6}}


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_shards")
    keys = []
    for s, n in enumerate(SIZES):
        write_tar(root / f"val-{s}.tar", [m for i in range(n) for m in plain_sample(f"v{s}_{i}", value=(s + i) % 6)])
        keys += [f"v{s}_{i}" for i in range(n)]
    return str(root / "val-*.tar"), keys


def _module(spec: str, rank: int, world: int, workers: int, batch_size: int = 4) -> ShardDataModule:
    dm = ShardDataModule(val_shards=spec, modalities=SEG, image_size=16, batch_size=batch_size, num_workers=workers)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)
    return dm


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (1, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("stage", ["val", "test", "predict"])
def test_every_sample_exactly_once_across_ranks_and_workers(eval_shards, world, workers, stage):
    spec, keys = eval_shards
    seen: Counter = Counter()
    for rank in range(world):
        dm = _module(spec, rank, world, workers)
        loader = {"val": dm.val_dataloader, "test": dm.test_dataloader, "predict": dm.predict_dataloader}[stage]()
        batches = list(loader)
        assert len(batches) == len(loader), (rank, len(batches), len(loader))  # the length Lightning plans with
        assert all(1 <= len(b["key"]) <= 4 and b["image"].shape[0] == len(b["key"]) for b in batches)
        seen.update(k for b in batches for k in b["key"])
        assert loader.skipped == 0
    assert seen == Counter({k: 1 for k in keys}), "each sample once: no repeats to fill a batch, none skipped"
    assert sum(seen.values()) == sum(SIZES) == 14


def test_a_second_pass_reads_the_same_samples_in_the_same_order(eval_shards):
    spec, keys = eval_shards
    loader = _module(spec, 0, 1, 0).val_dataloader()
    first, second = list(loader), list(loader)
    assert [k for b in first for k in b["key"]] == keys  # shard order, then sample order
    assert [b["key"] for b in first] == [b["key"] for b in second]
    assert [len(b["key"]) for b in first] == [4, 4, 4, 2]  # the last batch is partial, never padded


# ---- fixed validation noise ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def module(tiny_pixel_base_dir) -> MCMModule:
    torch.manual_seed(0)
    m = MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL, num_val_samples=2, val_sample_steps=1)
    with torch.no_grad():  # off the zero init, so the MCM contributes to the loss
        m.mcm.unet.conv_out.weight.normal_(0, 0.05)
    return m


def _validate(module: MCMModule, spec: str, batch_size: int, root) -> dict:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(root))  # the sample grid goes there
    (metrics,) = trainer.validate(module, datamodule=_module(spec, 0, 1, 0, batch_size), verbose=False)
    return metrics


def test_two_validations_of_the_same_weights_give_the_same_loss(module, eval_shards, tmp_path):
    spec, _ = eval_shards
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a = _validate(module, spec, 4, tmp_path)
    assert torch.equal(torch.rand(3), expected_next), "validation drew from torch's global generator"
    torch.manual_seed(123)  # whatever the global state
    b = _validate(module, spec, 4, tmp_path)
    assert a["val/loss"] == b["val/loss"] and a["val/base_loss"] == b["val/base_loss"], (a, b)
    # the noise belongs to the sample, not to its batch: other batch sizes, the same mean over the 14 samples
    c = _validate(module, spec, 3, tmp_path)
    assert c["val/loss"] == pytest.approx(a["val/loss"], rel=1e-6, abs=0)
    assert c["val/base_loss"] == pytest.approx(a["val/base_loss"], rel=1e-6, abs=0)
    assert a["val/loss"] != a["val/base_loss"], "the MCM changes the prediction (the check is not degenerate)"


def test_evaluation_noise_is_a_function_of_the_key(module):
    from mcm.training.adapter_module import evaluation_noise

    x0 = torch.zeros(3, 3, 16, 16)
    n1, t1 = evaluation_noise(module.forward_process, ["a", "b", "c"], x0)
    n2, t2 = evaluation_noise(module.forward_process, ["c", "a"], x0[:2])
    assert torch.equal(n1[2], n2[0]) and torch.equal(n1[0], n2[1]) and t1[2] == t2[0] and t1[0] == t2[1]
    assert not torch.equal(n1[0], n1[1]) and n1.shape == x0.shape and t1.dtype == torch.long
    assert ((0 <= t1) & (t1 < module.forward_process.num_train_timesteps)).all()
