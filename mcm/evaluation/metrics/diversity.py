"""Diversity: how different the samples of one condition are across seeds.

For each condition, the mean distance over all pairs of its samples (one per seed), then the
mean over conditions.  The distance is the RMS difference of pixels in [0, 1] by default,
or of features when ``features`` is given (e.g. a judge's pooled features: a cheap
perceptual proxy in place of LPIPS, which needs downloaded weights).  A model that ignores
the noise (mode collapse) scores 0.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchmetrics import Metric


def pairwise_distances(samples: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """Mean pairwise RMS distance per condition, ``(B,)`` float64.

    Args:
        samples: ``(S, B, C, H, W)`` images in [0, 1]: ``S`` seeds for each of ``B`` conditions.
        features: optional ``(N, C, H, W) -> (N, D)`` map; distances are then RMS over ``D``.
    """
    if samples.ndim != 5:
        raise ValueError(f"samples: expected (S seeds, B conditions, C, H, W), got shape {tuple(samples.shape)}")
    S, B = samples.shape[:2]
    if S < 2:
        raise ValueError(f"samples: diversity needs at least 2 seeds per condition, got {S}")
    x = samples.reshape(S * B, *samples.shape[2:])
    x = (features(x) if features is not None else x).reshape(S, B, -1).double()  # (S, B, D)
    i, j = torch.triu_indices(S, S, offset=1)
    d = (x[i] - x[j]).pow(2).mean(-1).sqrt()  # (pairs, B)
    return d.mean(0)


def diversity(samples: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean over conditions of :func:`pairwise_distances` (functional form of :class:`Diversity`)."""
    return float(pairwise_distances(samples, features).mean())


class Diversity(Metric):
    """Mean pairwise distance between samples of the same condition (torchmetrics ``Metric``).

    Args:
        features (callable | None, default None): ``(N, C, H, W) -> (N, D)``; ``None`` compares pixels.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.features = features
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: torch.Tensor) -> None:
        d = pairwise_distances(samples, self.features)
        self.total += d.sum().to(self.total.device)
        self.count += d.numel()

    def compute(self) -> float:
        return float(self.total) / int(self.count) if int(self.count) else float("nan")
