"""Sample grids of a training run: saved as PNG next to the run and logged to wandb when it is the logger.

Tiles are blown up (nearest) to at least 128 px (:data:`mcm.pipelines.grids.MIN_TILE`) and each row is
labelled ("segmentation", "base alone", "base + MCM, strength 1.5"), the same picture on disk and in wandb.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from mcm.pipelines.grids import labelled_grid

log = logging.getLogger(__name__)


def run_dir(module) -> Path:
    """Where a run keeps its files: the logger's directory if it has one, else the trainer's root."""
    trainer = module.trainer
    for lg in trainer.loggers:
        d = getattr(lg, "save_dir", None)
        if d:
            return Path(d)
    return Path(trainer.default_root_dir)


def log_image_grid(module, images: torch.Tensor, tag: str, name: str, nrow: int = 8,
                   row_labels: list[str] | None = None) -> Path:
    """Save ``images`` as ``<run>/samples/<tag>_<name>.png`` (upscaled, rows labelled) and log the same
    picture under ``tag`` to wandb if active."""
    grid = labelled_grid(images, nrow, row_labels)
    path = run_dir(module) / "samples" / f"{tag.replace('/', '_')}_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for lg in module.trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=tag, images=[grid], step=module.global_step, caption=[name])
    log.info("sample grid: %s", path)
    return path
