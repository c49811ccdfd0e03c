"""``RNGState``: a resumed run draws the random numbers the uninterrupted one would have (docs/reliability.md).

Lightning checkpoints the weights, optimizer, learning-rate schedulers and loops, but not the random
generators: a run resumed with ``--ckpt_path last`` started its noise, timesteps, modality and
caption dropout from the seed again, and ended with other weights (accelerate's ``save_state`` keeps
them for the same reason).  This callback

* stores torch's CPU generator, every CUDA device's generator, numpy's and Python's global generators
  in the checkpoint (per rank under DDP: each rank's own, gathered when the checkpoint is written),
* under DDP, when not resuming, reseeds each rank at ``on_train_start`` from (seed, rank) (``seed_rank``):
  ``seed_everything`` seeds every rank alike, so without it every rank drew the same timesteps, noise and
  dropout for its different images (the model is built before, from the common seed, as DDP needs),
* restores them at ``on_train_start`` — after everything that runs between loading and training
  (model setup, loggers, the sanity check), just before the first training step — and
* isolates validation during ``fit``: the generators are captured at ``on_validation_start`` and
  put back at ``on_validation_end``.  A run resumed from a checkpoint written just before a
  validation skips that validation; with validation isolated, it does not matter whether it ran.

The data's randomness does not come from these generators (``datamodules.shard_stream``: seeded per
sample, epoch and rank; the data loader's position is checkpointed by ``FixedLengthLoader``), so the
same weights, EMA, optimizer moments and learning rate come out of a killed-and-resumed run, bit for
bit on CPU (``tests/test_resume.py``, ``docs/reliability.md``).

States are plain tensors, lists and numbers, so ``torch.load(weights_only=True)`` reads the checkpoint.
``mcm fit`` adds this callback when the config does not list it.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def capture() -> dict[str, Any]:
    """This process's global random states as plain containers."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("the checkpoint holds the RNG states of %d CUDA devices, this process sees %d: CUDA "
                        "generators not restored", len(cuda), torch.cuda.device_count())


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed of its own for ``rank`` of a run seeded with ``seed`` (numpy's ``SeedSequence``: streams
    of different ``(seed, rank)`` pairs do not overlap as ``seed + rank`` would across runs)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank)]).generate_state(1)[0])


def seed_rank(rank: int) -> None:
    """Under DDP, give this rank its own torch (CPU and CUDA), numpy and Python streams, seeded by the run's seed
    (``seed_everything``'s ``PL_GLOBAL_SEED``) and the rank, so that ranks draw different timesteps, noise and
    dropout for their different images.  Without a run seed the processes' own random seeds already differ."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is None:
        return
    s = rank_seed(int(seed), rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # CPU and every CUDA device of this process
    log.info("rank %d draws from its own random streams (seed %s, rank seed %d)", rank, seed, s)


def _gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's state (rank order) under ``torch.distributed``, else ``[state]``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


class RNGState(Callback):
    """Checkpoints and restores the global random generators; keeps validation from consuming them."""

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None
        self._before_validation: dict[str, Any] | None = None

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # while validating, the states to keep are those training resumes with, not validation's
        state = self._before_validation if self._before_validation is not None else capture()
        return {"ranks": _gather(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("ranks") or [])

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._loaded:
            if trainer.world_size > 1:
                seed_rank(trainer.global_rank)
            return
        rank = trainer.global_rank
        if len(self._loaded) != trainer.world_size:
            log.warning("the checkpoint holds random states of %d rank(s), this run has %d: every rank takes "
                        "rank %d's", len(self._loaded), trainer.world_size, min(rank, len(self._loaded) - 1))
        restore(self._loaded[min(rank, len(self._loaded) - 1)])
        self._loaded = None

    # ---- validation inside fit draws nothing from the training streams ----------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        self._before_validation = capture()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._before_validation is not None:
            restore(self._before_validation)
            self._before_validation = None
