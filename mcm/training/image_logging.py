"""Sample grids of a training run: saved as PNG next to the run and logged to wandb when it is the logger."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision.utils import save_image

from mcm.pipelines.grids import grid_image

log = logging.getLogger(__name__)


def run_dir(module) -> Path:
    """Where a run keeps its files: the logger's directory if it has one, else the trainer's root."""
    trainer = module.trainer
    for lg in trainer.loggers:
        d = getattr(lg, "save_dir", None)
        if d:
            return Path(d)
    return Path(trainer.default_root_dir)


def log_image_grid(module, images: torch.Tensor, tag: str, name: str, nrow: int = 8) -> Path:
    """Save ``images`` as ``<run>/samples/<name>.png`` and log them under ``tag`` to wandb if active."""
    grid = grid_image(images, nrow)
    path = run_dir(module) / "samples" / f"{tag.replace('/', '_')}_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    for lg in module.trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=tag, images=[grid], step=module.global_step, caption=[name])
    log.info("sample grid: %s", path)
    return path
