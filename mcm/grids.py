"""Sample grids: saved as PNG next to the run and logged to wandb when it is the logger."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def grid_image(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """``(B,3,H,W)`` in [0, 1] -> one ``(3, H', W')`` grid."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=pad, pad_value=1.0)


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
