"""Sketch alignment: precision / recall / F1 of the generated image's edges against the input sketch.

Edges come from the sketch plugin's own detector (:func:`modalities.sketch.detect_edges`,
Canny), so a sketch derived from a photo and the evaluation agree.  A pixel tolerance makes
the match forgiving of one-pixel displacements, as in the BSDS boundary benchmark (Martin et
al. 2004): a predicted edge pixel is correct if a sketch stroke lies within ``tolerance``
pixels (Chebyshev distance: a dilation by a square), and a stroke pixel is recalled if a
predicted edge lies within ``tolerance`` of it.  Counts are summed over the whole set.
"""
from __future__ import annotations

import torch
from kornia.morphology import dilation
from torchmetrics import Metric


def dilate(edges: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Binary ``(B, 1, H, W)`` map grown by ``tolerance`` pixels in every direction (square structuring element)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance == 0:
        return edges
    side = 2 * tolerance + 1
    return dilation(edges, torch.ones(side, side, dtype=edges.dtype, device=edges.device))  # geodesic border


def _binary(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{what}: expected a (B, 1, H, W) edge map, got shape {tuple(x.shape)}")
    return (x.float() > 0.5).float()


def edge_counts(pred_edges: torch.Tensor, target_edges: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """``[matched predicted, predicted, matched target, target]`` pixel counts (float64)."""
    p, t = _binary(pred_edges, "pred_edges"), _binary(target_edges, "target_edges")
    if p.shape != t.shape:
        raise ValueError(f"pred_edges {tuple(p.shape)} and target_edges {tuple(t.shape)} differ in shape")
    return torch.stack([(p * dilate(t, tolerance)).sum(), p.sum(), (t * dilate(p, tolerance)).sum(), t.sum()]).double()


def prf_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Precision, recall, F1 from :func:`edge_counts`; an empty prediction has precision 1, an empty target recall 1."""
    mp, n_p, mt, n_t = (float(c) for c in counts)
    precision = mp / n_p if n_p > 0 else 1.0
    recall = mt / n_t if n_t > 0 else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def edge_alignment(pred_edges: torch.Tensor, target_edges: torch.Tensor, tolerance: int = 1) -> dict[str, float]:
    """``{"precision", "recall", "f1"}`` between two binary edge maps ``(B, 1, H, W)``."""
    return prf_from_counts(edge_counts(pred_edges, target_edges, tolerance))


def plugin_edges(images: torch.Tensor, low_threshold: float | None = None, high_threshold: float | None = None,
                 sigma: float | None = None) -> torch.Tensor:
    """:func:`modalities.sketch.detect_edges` of ``images``; ``None`` settings keep the detector's own defaults."""
    from modalities.sketch import detect_edges

    opts = {k: v for k, v in dict(low_threshold=low_threshold, high_threshold=high_threshold, sigma=sigma).items()
            if v is not None}
    return detect_edges(images.float(), **opts)


def sketch_alignment(images: torch.Tensor, sketches: torch.Tensor, tolerance: int = 1,
                     low_threshold: float | None = None, high_threshold: float | None = None,
                     sigma: float | None = None) -> dict[str, float]:
    """Edges of RGB ``images`` ``(B, 3, H, W)`` in [0, 1] against ``sketches`` ``(B, 1, H, W)`` (strokes = 1).

    Canny settings default to the detector's (``None``); pass the sketch plugin's when it was configured.
    """
    return edge_alignment(plugin_edges(images, low_threshold, high_threshold, sigma), sketches, tolerance)


class SketchAlignment(Metric):
    """Edge precision / recall / F1 of generated images against input sketches (torchmetrics ``Metric``).

    Args:
        tolerance (int, default 1): match distance in pixels.
        low_threshold / high_threshold / sigma (float | None, default None): Canny settings; ``None``
            keeps ``detect_edges``' defaults.  Use the sketch plugin's so evaluation sees what training saw.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tolerance: int = 1, low_threshold: float | None = None, high_threshold: float | None = None,
                 sigma: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.tolerance, self.canny = tolerance, (low_threshold, high_threshold, sigma)
        self.add_state("counts", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, sketches: torch.Tensor) -> None:
        edges = plugin_edges(images, *self.canny)
        if tuple(sketches.shape[-2:]) != tuple(edges.shape[-2:]):
            raise ValueError(f"sketches {tuple(sketches.shape)} and images {tuple(images.shape)} differ in size")
        self.counts += edge_counts(edges, sketches.to(edges.device), self.tolerance).to(self.counts.device)

    def compute(self) -> dict[str, float]:
        return prf_from_counts(self.counts)
