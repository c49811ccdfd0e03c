"""Helpers on boolean masks shared by the plugins and, above them, the evaluation and the app."""
from __future__ import annotations

import torch


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` bool masks -> ``(B,)`` float: the IoU of each pair, 1 where both are empty (they agree: nothing
    there).  The one IoU of the project: the sketch hints' foreground IoU, the regional figures' object IoU and
    the app's per-image object IoU all use it, so an empty map means the same everywhere."""
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    union = (a | b).sum(1)
    inter = (a & b).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union, dtype=torch.float))


def foreground_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` label maps -> ``(B,)``: the IoU of their objects (label != 0), 1 where neither has one."""
    return mask_iou(pred != 0, target != 0)
