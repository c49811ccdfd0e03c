"""Segmentation alignment: mIoU and pixel accuracy between a judge's labels and the input map.

The partial-mask variant is the same computation with ``ignore_index=255``: only pixels the
user fixed (known pixels) count.  Scores accumulate one confusion matrix over the whole set
(the usual dataset-level mIoU, as in the Cityscapes / ADE20K benchmarks); a class enters the
mean only if it occurs in the target or the prediction (its union is not empty).
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix

#: the ``partial_mask`` modality's "unknown" label
UNKNOWN = 255


def _labels(pred: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` logits -> ``(B, H, W)`` labels; labels pass through."""
    return pred.argmax(1) if pred.is_floating_point() and pred.ndim == 4 else pred.long()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = target class, columns = predicted class.

    Args:
        pred: ``(B, H, W)`` integer labels or ``(B, K, H, W)`` logits.
        target: ``(B, H, W)`` integer labels in ``0..K-1`` (or ``ignore_index``).
        ignore_index: target label whose pixels are skipped (e.g. 255 = unknown).
    """
    pred, target = _labels(pred), target.long()
    if pred.shape != target.shape:
        raise ValueError(f"pred: labels of shape {tuple(pred.shape)} do not match target {tuple(target.shape)}")
    # checked here, not by torchmetrics' validate_args, for an error that names the bad labels and the fix
    t = target[target != ignore_index] if ignore_index is not None else target
    bad = (t < 0) | (t >= num_classes)
    if bad.any():
        raise ValueError(f"target: labels {torch.unique(t[bad])[:8].tolist()} outside 0..{num_classes - 1} "
                         f"(num_classes={num_classes}, ignore_index={ignore_index})")
    pred = pred.clamp(0, num_classes - 1)  # a judge never predicts outside its classes; guard anyway
    cm = multiclass_confusion_matrix(pred, target, num_classes, ignore_index=ignore_index, validate_args=False)
    return cm.long().cpu()


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU of each class (NaN where the class is absent from target and prediction).

    Derived from the confusion matrix here rather than by ``MulticlassJaccardIndex``: that one reduces in
    float32 and scores an absent class 0, where this keeps float64 and NaN (so the mean can skip it).
    """
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))


def miou_from_confusion(cm: torch.Tensor) -> float:
    iou = iou_per_class(cm)
    valid = ~iou.isnan()
    return float(iou[valid].mean()) if valid.any() else float("nan")


def pixel_accuracy_from_confusion(cm: torch.Tensor) -> float:
    total = cm.sum()
    return float(cm.diag().sum().double() / total) if total > 0 else float("nan")


def segmentation_alignment(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                           ignore_index: int | None = None, pred_other: int | None = None) -> dict[str, float]:
    """``{"miou", "pixel_acc"}`` of ``pred`` against ``target`` (functional form of :class:`SegmentationAlignment`).

    ``pred_other``: a predicted label meaning "none of the module's classes" (a judge's label-map ``ignore``,
    255). Such pixels count as errors, never as skipped: they become an extra class K, so they are false
    negatives of their target class, and the mean runs over the K real classes only.
    """
    if pred_other is None:
        cm = confusion_matrix(pred, target, num_classes, ignore_index)
        return {"miou": miou_from_confusion(cm), "pixel_acc": pixel_accuracy_from_confusion(cm)}
    pred = _labels(pred)
    cm = confusion_matrix(torch.where(pred == pred_other, num_classes, pred), target, num_classes + 1, ignore_index)
    iou = iou_per_class(cm)[:num_classes]
    valid = ~iou.isnan()
    return {"miou": float(iou[valid].mean()) if valid.any() else float("nan"),
            "pixel_acc": pixel_accuracy_from_confusion(cm)}


def partial_alignment(pred: torch.Tensor, partial: torch.Tensor, num_classes: int,
                      pred_other: int | None = None) -> dict[str, float]:
    """Segmentation alignment on known pixels only (``partial`` is 255 where unknown)."""
    return segmentation_alignment(pred, partial, num_classes, ignore_index=UNKNOWN, pred_other=pred_other)


class SegmentationAlignment(Metric):
    """Dataset-level mIoU and pixel accuracy (torchmetrics ``Metric``; states sum across processes).

    Args:
        num_classes (int): number of classes K.
        ignore_index (int | None, default None): target label to skip; 255 for partial masks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.confmat.device)

    def compute(self) -> dict[str, float]:
        return {"miou": miou_from_confusion(self.confmat), "pixel_acc": pixel_accuracy_from_confusion(self.confmat)}
