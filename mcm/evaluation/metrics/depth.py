"""Depth alignment: scale-and-shift-invariant RMSE and delta < 1.25 accuracy.

A monocular judge recovers depth only up to an affine map, so each prediction is first
aligned to its target by the least-squares scale ``s`` and shift ``b`` minimising
``sum (s * pred + b - target)^2`` (Ranftl et al. 2020, "Towards robust monocular depth
estimation" (MiDaS), eq. 4; here with ``s >= 0`` so near and far cannot swap), then
compared.  ``delta1`` is the share of pixels with ``max(a / t, t / a) < 1.25`` (Eigen et
al. 2014); both sides are clamped to ``eps`` first because depth 0 (nearest) would divide
by zero.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


def _flat(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{what}: expected a (B, 1, H, W) depth map, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).double()


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``s * pred + b`` with per-image least-squares ``(s, b)``; same shape as ``pred``, float64.

    The scale is kept ``>= 0``: a prediction with near and far swapped is not rescued by a
    negative scale (with ``s = 0``, ``b`` is the target's mean and the error its spread).  A
    constant prediction cannot be scaled either: ``s = 0`` too.
    """
    p, t = _flat(pred, "pred"), _flat(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    w = torch.ones_like(p) if mask is None else _flat(mask, "mask").clamp(0, 1)
    n = w.sum(1, keepdim=True).clamp(min=1)
    mp, mt = (w * p).sum(1, keepdim=True) / n, (w * t).sum(1, keepdim=True) / n
    var = (w * (p - mp) ** 2).sum(1, keepdim=True)
    cov = (w * (p - mp) * (t - mt)).sum(1, keepdim=True)
    s = torch.where(var > 1e-12, cov / var.clamp(min=1e-12), torch.zeros_like(var)).clamp(min=0)
    b = mt - s * mp
    return (s * p + b).reshape(pred.shape[0], 1, *pred.shape[-2:])


def ssi_rmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image scale-and-shift-invariant RMSE, ``(B,)`` float64."""
    a, t = _flat(align_scale_shift(pred, target, mask), "pred"), _flat(target, "target")
    w = torch.ones_like(t) if mask is None else _flat(mask, "mask").clamp(0, 1)
    return ((w * (a - t) ** 2).sum(1) / w.sum(1).clamp(min=1)).sqrt()


def delta_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 1.25, eps: float = 1e-3,
                   mask: torch.Tensor | None = None, align: bool = True) -> torch.Tensor:
    """Per-image share of pixels with ``max(a/t, t/a) < threshold`` after alignment, ``(B,)`` float64."""
    a = align_scale_shift(pred, target, mask) if align else pred
    a, t = _flat(a, "pred").clamp(min=eps), _flat(target, "target").clamp(min=eps)
    ok = (torch.maximum(a / t, t / a) < threshold).double()
    w = torch.ones_like(t) if mask is None else _flat(mask, "mask").clamp(0, 1)
    return (w * ok).sum(1) / w.sum(1).clamp(min=1)


def depth_alignment(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{"ssi_rmse", "delta1"}`` averaged over images (functional form of :class:`DepthAlignment`)."""
    return {"ssi_rmse": float(ssi_rmse(pred, target, mask).mean()),
            "delta1": float(delta_accuracy(pred, target, mask=mask).mean())}


class DepthAlignment(Metric):
    """Mean per-image ssi-RMSE and delta1 (torchmetrics ``Metric``).

    Args:
        threshold (float, default 1.25): the delta threshold.
        eps (float, default 1e-3): floor for both depths in the delta ratio (0 = nearest).
    """

    is_differentiable = False
    higher_is_better = None  # ssi_rmse lower, delta1 higher
    full_state_update = False

    def __init__(self, threshold: float = 1.25, eps: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.threshold, self.eps = threshold, eps
        self.add_state("rmse_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("delta_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        target = target.to(pred.device)
        self.rmse_sum += ssi_rmse(pred, target, mask).sum().to(self.rmse_sum.device)
        self.delta_sum += delta_accuracy(pred, target, self.threshold, self.eps, mask).sum().to(self.delta_sum.device)
        self.count += pred.shape[0]

    def compute(self) -> dict[str, float]:
        n = int(self.count)
        if n == 0:
            return {"ssi_rmse": float("nan"), "delta1": float("nan")}
        return {"ssi_rmse": float(self.rmse_sum) / n, "delta1": float(self.delta_sum) / n}
