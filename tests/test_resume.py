"""Exact resume (docs/reliability.md): a ``shapes32`` fit killed with SIGKILL and resumed with ``--ckpt_path last``
ends with the MCM weights, EMA weights, optimizer moments and learning rate of the uninterrupted run, bit for
bit on CPU; so does a run stopped by ``max_time``.  Plus the pieces one by one: random states
(``RNGState``), the data loader's position (``FixedLengthLoader.state_dict``), per-sample augmentation.

The harness is ``bench/resume.py`` (``python -m bench.resume --points 5`` gives docs/reliability.md's
figures): the experiment ``experiments/shapes32/multimodal.yaml`` (the shipped frozen shapes32 base, 4
modalities, modality and caption dropout, EMA, one data worker, validation with grids every 4 steps),
16 training images = epochs of 4 steps, a checkpoint every 2 steps.  A kill is placed without timing:
the run blocks at the chosen step after writing a file, and is SIGKILLed then.
"""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from bench import resume as R
from datamodules import ShardDataModule, write_shapes_shards
from mcm.cli.lightning_cli import run_lightning_cli
from mcm.models.frozen_base import BaseMismatchError
from mcm.training.checkpoint_io import AtomicCheckpointIO
from mcm.training.rng_state import RNGState, capture, restore

MAX_STEPS, EVERY, TRAIN = 10, 2, 16  # 4 steps per epoch; checkpoints at 2, 4, 6, 8, 10; validation at 4, 8
TESTS = Path(__file__).resolve().parent


def in_process(cwd: Path, config: Path, *extra: str):
    """``mcm fit`` in this process (one torch thread, as the subprocesses), cwd = the run's directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", ["mcm"])
        mp.setenv("MCM_ALLOW_CLASS_PREFIXES", "bench.resume,reliability_callbacks")
        return run_lightning_cli(R.fit_argv(config, *extra))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    shards = R.make_shards(root / "shards", train=TRAIN, val=8)
    ref_dir = R.fresh(root / "reference")
    cli = in_process(ref_dir, R.overlay(ref_dir / "tiny.yaml", shards, max_steps=MAX_STEPS, every=EVERY))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO), "atomic checkpoints by default"
    ref = R.end_state(ref_dir)
    assert ref["global_step"] == MAX_STEPS and "ema" in ref
    return root, shards, ref


# kill at the start of step 5: resumes from step 4 (an epoch boundary, and a validation step the resumed run
# skips); at the start of step 7: from step 6 (mid-epoch, the loader resumes at batch 2 of 4)
@pytest.mark.parametrize("kill_at,resumed_from", [(5, 4), (7, 6)])
def test_sigkill_then_resume_equals_the_uninterrupted_run(harness, kill_at, resumed_from, tiny_uncond_dir):
    root, shards, ref = harness
    steps = root / f"steps_{kill_at}.txt"
    r = R.resume_point(root, shards, ref, kill_at, max_steps=MAX_STEPS, every=EVERY, resume_in_process=in_process,
                       resume_args=("--trainer.callbacks+=reliability_callbacks.StepLog",
                                    "--trainer.callbacks.path", str(steps)))
    assert r["killed_at"] == kill_at and r["resumed_from"] == resumed_from, r
    # the resumed run continues at the step after its checkpoint and ends where the reference did
    resumed = [int(line.split()[2]) for line in steps.read_text().split("\n") if line.strip()]
    assert resumed == list(range(resumed_from + 1, MAX_STEPS + 1)), resumed
    assert r["global_step"] == (MAX_STEPS, MAX_STEPS)
    # every MCM weight, EMA shadow weight, Adam moment and the learning rate, bit for bit
    assert r["weights_tensors"] > 100 and r["ema_tensors"] == r["weights_tensors"]
    assert r["optimizer_tensors"] == 3 * r["weights_tensors"]  # step, exp_avg, exp_avg_sq per parameter
    assert r["equal"], f"{r['n_different']} tensors differ, e.g. {r['different']}"
    assert r["lr"][0] == r["lr"][1]
    ckpt_dir = r["cwd"] / R.CKPT.parent
    assert not list(ckpt_dir.glob("*.tmp")), "no temporary checkpoint is left behind"
    end = R.end_state(r["cwd"])
    assert len(end["callbacks"][next(k for k in end["callbacks"] if "RNGState" in k)]["ranks"]) == 1
    if kill_at == 5:  # the same checkpoint onto another base: refused before any weight is loaded
        with pytest.raises(BaseMismatchError, match=r"this checkpoint was trained on base 'shapes32'.* but the "
                                                    r"loaded base .*tiny_uncond.*force_base=True"):
            in_process(r["cwd"], r["cwd"] / "tiny.yaml", "--ckpt_path", "last", "--trainer.max_steps", "12",
                       "--model.init_args.base", str(tiny_uncond_dir))


def test_sigkill_then_resume_equals_the_uninterrupted_run_under_ddp(harness):
    """Two CPU ranks (gloo), each drawing from its own (seed, rank) stream: killed at the start of step 3 (of an
    epoch of 2 steps per rank), resumed from step 2, every weight, EMA weight, Adam moment and the learning rate
    equal the uninterrupted DDP run's, and the checkpoint holds both ranks' random states."""
    root, shards, _ = harness
    ref_dir = R.fresh(root / "reference_ddp")
    R.run_fit(ref_dir, R.overlay(ref_dir / "tiny.yaml", shards, max_steps=4, every=EVERY, ddp=True))
    ref = R.end_state(ref_dir)
    assert ref["global_step"] == 4
    ranks = ref["callbacks"][next(k for k in ref["callbacks"] if "RNGState" in k)]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"]), "ranks share one stream"
    r = R.resume_point(root, shards, ref, 3, max_steps=4, every=EVERY, ddp=True)
    assert r["killed_at"] == 3 and r["resumed_from"] == 2, r
    assert r["equal"], f"{r['n_different']} tensors differ, e.g. {r['different']}"


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # resumed without the Timer, on purpose
def test_max_time_stop_writes_the_last_checkpoint_and_resumes_exactly(harness):
    """Lightning's ``max_time`` stop at step 9 (off the checkpoint interval): ``last.ckpt`` holds step 9, not 8,
    and the run resumed from it ends as the uninterrupted one."""
    root, shards, ref = harness
    r = R.max_time_point(root, shards, ref, 9, max_steps=MAX_STEPS, every=EVERY, resume_in_process=in_process,
                         run=in_process)
    assert r["stopped_by_max_time_at"] == 9, r
    assert r["equal"], f"{r['n_different']} tensors differ, e.g. {r['different']}"


# ---- the pieces --------------------------------------------------------------------------------------------

def test_rng_state_round_trip_and_validation_isolation():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = capture()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    restore(saved)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    # the callback: state_dict -> load_state_dict -> on_train_start restores; validation draws are undone
    cb = RNGState()
    torch.manual_seed(5)
    state = cb.state_dict()
    expected = torch.rand(4)
    torch.manual_seed(99)
    trainer = type("T", (), {"global_rank": 0, "world_size": 1})()
    cb.load_state_dict(state)
    cb.on_train_start(trainer, None)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(7)
    cb.on_validation_start(trainer, None)
    torch.rand(100), np.random.rand(10), random.random()  # what validation draws
    mid = cb.state_dict()  # a checkpoint written during validation keeps the training state
    cb.on_validation_end(trainer, None)
    after_val = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_val, torch.rand(4))
    torch.manual_seed(7)
    expected = torch.rand(4)
    restore(mid["ranks"][0])
    assert torch.equal(torch.rand(4), expected)
    buf = io.BytesIO()  # plain tensors and containers: a checkpoint still loads with weights_only=True
    torch.save(state, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["ranks"][0]["torch"], state["ranks"][0]["torch"])


@pytest.fixture(scope="module")
def shards32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards32")
    write_shapes_shards(out, train=24, val=0, size=32, shard_size=8, workers=1)
    return out


def _train_loader(shards: Path, workers: int, **kw):
    dm = ShardDataModule(train_shards=str(shards / "train-*.tar"), modalities={"segmentation": {}, "partial_mask": {}},
                         batch_size=4, num_workers=workers, **kw)
    return dm.train_dataloader()


def test_loader_resumes_at_its_position_with_the_same_batches(shards32):
    """Lightning prefetches a batch, so the loader's position is the trainer's count (``position_fn``), not how
    many batches it has handed out; a new loader given that ``state_dict`` continues with the next batch."""
    full = list(_train_loader(shards32, 0))
    assert len(full) == 6
    loader = _train_loader(shards32, 0)
    consumed = 0
    loader.position_fn = lambda: consumed
    it = iter(loader)
    for _ in range(3):  # the trainer consumed 2, the fetcher holds the 3rd
        next(it)
    consumed = 2
    state = loader.state_dict()
    assert state["batches"] == 2 and state["epoch"] == 0 and state["seen"] == 8
    resumed = _train_loader(shards32, 0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["key"] for b in rest] == [b["key"] for b in full[2:]]
    for a, b in zip(rest, full[2:]):
        for k in ("image", "segmentation", "partial_mask"):
            assert torch.equal(a[k], b[k]), k
    assert resumed.seen == 24
    # a state from another epoch (a checkpoint at an epoch's last batch) does not skip anything
    other = _train_loader(shards32, 0)
    other.load_state_dict({**state, "epoch": 5})
    assert [b["key"] for b in other] == [b["key"] for b in full]


def test_augmentation_depends_on_the_sample_not_on_the_process(shards32):
    """Crops, flips and plugin augmentation are seeded by (seed, epoch, key): the same sample gets the same
    tensors with 0 or 2 data workers and whatever torch's global generator holds."""
    torch.manual_seed(0)
    a = {k: (img, seg) for b in _train_loader(shards32, 0, shuffle_buffer=0)
         for k, img, seg in zip(b["key"], b["image"], b["partial_mask"])}
    torch.manual_seed(123)
    b = {k: (img, seg) for bt in _train_loader(shards32, 2, shuffle_buffer=0)
         for k, img, seg in zip(bt["key"], bt["image"], bt["partial_mask"])}
    # (the epoch's cut of the endless stream takes other samples when 2 workers interleave their shards)
    common = a.keys() & b.keys()
    assert len(a) == 24 and len(common) >= 12, (len(a), len(common))
    for k in common:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k
    # and the crops do vary between samples and epochs (the seeding is not degenerate)
    loader = _train_loader(shards32, 0, shuffle_buffer=0, crop_scale=(0.3, 0.5))
    ep0 = {k: img for bt in loader for k, img in zip(bt["key"], bt["image"])}
    loader.epoch_fn = lambda: 1
    ep1 = {k: img for bt in loader for k, img in zip(bt["key"], bt["image"])}
    assert sum(not torch.equal(ep0[k], ep1[k]) for k in ep0) > 20


def _decode_with_crops(shards32) -> list:
    return [k for b in _train_loader(shards32, 0, shuffle_buffer=0, crop_scale=(0.3, 0.5)) for k in b["key"]]


def test_decoding_seeds_only_its_own_generators(shards32):
    """Regression (issue: correctness): decoding in the main process (num_workers=0) ran ``torch.manual_seed`` for
    each crop, which reseeds every CUDA generator too (fork_rng(devices=[]) restores only the CPU one): the
    training step's CUDA noise was reseeded by the data.  Decoding now seeds only the CPU generator inside
    fork_rng; the CPU state is the same after decoding and no CUDA generator is touched."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with mock.patch("torch.cuda.manual_seed_all", side_effect=AssertionError("decoding reseeded CUDA")), \
            mock.patch("torch.cuda.manual_seed", side_effect=AssertionError("decoding reseeded CUDA")):
        keys = _decode_with_crops(shards32)
    assert len(keys) == 24
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoding_leaves_the_cuda_generator_alone(shards32):
    torch.cuda.manual_seed_all(11)
    before = torch.cuda.get_rng_state()
    _decode_with_crops(shards32)
    assert torch.equal(torch.cuda.get_rng_state(), before)
