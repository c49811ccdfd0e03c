"""``CheckpointOnStop``: ``last.ckpt`` holds the step where training stopped, however it stopped.

``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` writes at multiples of N only; a run that
ends elsewhere — Lightning's ``max_time`` (``Timer``), ``max_steps`` not a multiple of N, early
stopping, a callback setting ``trainer.should_stop`` — kept the checkpoint of its last multiple (a
``max_time`` stop at step 1,386 left ``last.ckpt`` at step 1,200).  At ``on_train_end`` this callback
has every ``ModelCheckpoint`` with ``save_last`` write ``last`` again if the step moved since its last
save, so ``--ckpt_path last`` continues exactly where the run ended (with the data position and
random state of that step: ``FixedLengthLoader``, :class:`mcm.training.rng_state.RNGState`).

``mcm fit`` adds this callback when the config does not list it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)


class CheckpointOnStop(Callback):
    """Writes ``last`` of every ``ModelCheckpoint(save_last=...)`` at the step where training stops.

    * ``on_train_batch_end`` of the final step — ``trainer.should_stop`` set (``Timer`` for ``max_time``,
      a callback) or ``max_steps`` reached: the checkpoint has the state of that step's end, exactly
      like ``ModelCheckpoint``'s own step checkpoints, so a resume continues mid-epoch at the next batch.
      This callback moves itself to the end of ``trainer.callbacks`` at ``setup`` so that it runs after
      the ``Timer`` and after the ``ModelCheckpoint`` s (which it does not pre-empt: a step they already
      saved is not written twice).
    * ``on_validation_end`` with ``should_stop`` set (early stopping on a validation metric);
    * ``on_train_end``: whatever else ended training, if the step moved since the last save.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self in trainer.callbacks:
            trainer.callbacks.remove(self)
            trainer.callbacks.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        max_steps = trainer.max_steps
        if trainer.should_stop or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps):
            self._save_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.should_stop and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last(trainer)

    def _save_last(self, trainer) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint) or not cb.save_last:
                continue
            if getattr(cb, "_last_global_step_saved", None) == trainer.global_step:
                continue  # already written at this step
            try:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            except AttributeError:  # a Lightning without these internals: write last.ckpt the public way
                if cb.dirpath is None:
                    continue
                trainer.save_checkpoint(str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"))
            log.info("training stopped at step %d: wrote the last checkpoint (%s)", trainer.global_step,
                     getattr(cb, "last_model_path", cb.dirpath))
