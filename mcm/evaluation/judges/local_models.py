"""The judges of one evaluation, shipped or local: :func:`build_judges` -> :class:`Judges` (docs/judges.md).

Every judge is a :class:`~mcm.evaluation.judges.Judge`: ``predict(images)`` gives labels ``(B, H, W)``
or depth ``(B, 1, H, W)`` at the input size, ``features(images)`` the FID/KID space, ``name`` where it
came from.  The shipped ``shapes32`` judges and local ``transformers`` models
(``modalities.annotators``: ``--segmenter DIR --label-map FILE --depth-model DIR``) are both wrapped
in it, so metric code (``mcm evaluate``, the alignment callback) never asks which one it has::

    from mcm.evaluation.judges.local_models import build_judges
    judges = build_judges()                                          # shapes32-segmentation / -depth
    judges = build_judges(segmenter="models/segformer", label_map="labels.yaml", depth_model="models/dpt",
                          num_classes=3)
    labels = judges.segment(images)        # (B, H, W) int64 in the module's classes (255 = ignored class)
    depth = judges.estimate_depth(images)  # (B, 1, H, W) in [0, 1], 0 = nearest
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import BUILTIN_JUDGES, Judge, load_judge

log = logging.getLogger(__name__)

__all__ = ["Judges", "build_judges", "local_judge"]


def local_judge(path: str | Path, task: str, label_map: str | Path | Mapping | None = None,
                num_classes: int | None = None, depth_kind: str = "auto",
                device: str | torch.device = "cpu") -> Judge:
    """A :class:`Judge` over a local ``transformers`` segmenter or depth model (``modalities.annotators``)."""
    from modalities.annotators import load_depth_model, load_segmenter

    if task == "segmentation":
        seg = load_segmenter(path, label_map, num_classes, device=device)
        return Judge(seg, "segmentation", seg.num_classes, seg.name)
    if task == "depth":
        if label_map is not None:
            raise ValueError(f"depth model {str(path)!r}: a label map applies to segmenters only")
        depth = load_depth_model(path, depth_kind, device=device)
        return Judge(depth, "depth", None, depth.name)
    raise ValueError(f"task: expected 'segmentation' or 'depth', got {task!r}")


@dataclass
class Judges(Mapping):
    """The judges of one evaluation; ``None`` where a metric is off.  Also a read-only mapping
    ``{"segmentation", "depth", "features"}`` (how ``mcm.evaluation.evaluate.score`` reads them)."""

    segmentation: Judge | None = None
    depth: Judge | None = None
    features: Judge | None = None
    label_map: str | None = None  # the label-map file a local segmenter uses, for reports

    _KEYS = ("segmentation", "depth", "features")

    def __getitem__(self, key: str) -> Judge | None:
        if key not in self._KEYS:
            raise KeyError(f"{key!r}: judges are {list(self._KEYS)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def names(self) -> dict[str, str | None]:
        """Where each judge came from (a built-in name or a directory), as ``metrics.json`` records it."""
        return {k: (j.name if j is not None else None) for k, j in self.items()}

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Labels ``(B, H, W)`` int64 of RGB ``(B, 3, H, W)`` in [0, 1]."""
        if self.segmentation is None:
            raise ValueError("no segmentation judge: build_judges(segmenter=...) or a base with shipped judges")
        return self.segmentation.predict(images)

    def estimate_depth(self, images: torch.Tensor) -> torch.Tensor:
        """Depth ``(B, 1, H, W)`` (0 = nearest) of RGB ``(B, 3, H, W)`` in [0, 1]."""
        if self.depth is None:
            raise ValueError("no depth judge: build_judges(depth_model=...) or a base with shipped judges")
        return self.depth.predict(images)


def _spec_judge(spec: str, task: str | None, device: str | torch.device) -> Judge | None:
    return None if spec.lower() == "none" else load_judge(spec, task=task, device=device)


def build_judges(segmenter: str | Path | None = None, label_map: str | Path | Mapping | None = None,
                 depth_model: str | Path | None = None, base_name: str | None = "shapes32", *,
                 seg_judge: str | None = None, depth_judge: str | None = None, feature_judge: str | None = None,
                 num_classes: int | None = None, depth_kind: str = "auto",
                 device: str | torch.device = "cpu") -> Judges:
    """The segmentation, depth and feature judges, from local models, judge specs or the base's shipped ones.

    Args:
        segmenter: local ``transformers`` segmenter directory (``AutoModelForSemanticSegmentation``).
        label_map: JSON/YAML file (or dict) from the segmenter's labels to the module's class ids.
        depth_model: local ``transformers`` depth directory (``AutoModelForDepthEstimation``).
        base_name: judges shipped for this base (``"<base>-segmentation"`` / ``"<base>-depth"``) are the
            defaults; ``None``, or a base that ships none: that judge is off unless given.
        seg_judge, depth_judge: any ``load_judge`` spec instead (``"none"``: off); not with
            ``segmenter`` / ``depth_model``.
        feature_judge: the FID/KID feature judge spec (default: the segmentation judge; ``"none"``: off).
        num_classes: the module's segmentation classes, checked against the label map / segmenter.
        depth_kind: ``"auto"``, ``"inverse"`` or ``"metric"``: how the depth model's output is read.
    """
    for local, spec, flag in ((segmenter, seg_judge, "segmenter / seg_judge"),
                              (depth_model, depth_judge, "depth_model / depth_judge")):
        if local is not None and spec is not None:
            raise ValueError(f"{flag}: give one judge per task, got both {str(local)!r} and {spec!r}")
    if label_map is not None and segmenter is None:
        raise ValueError(f"label_map {str(label_map)!r}: it maps a local segmenter's labels; give segmenter= too")

    def default(task: str) -> Judge | None:
        name = f"{base_name}-{task}"
        if base_name is None or name not in BUILTIN_JUDGES:
            log.info("no %s judge: base %r ships none and none was given", task, base_name)
            return None
        return load_judge(name, task=task, device=device)

    if segmenter is not None:
        seg = local_judge(segmenter, "segmentation", label_map, num_classes, device=device)
    else:
        seg = _spec_judge(seg_judge, "segmentation", device) if seg_judge is not None else default("segmentation")
    if depth_model is not None:
        depth = local_judge(depth_model, "depth", depth_kind=depth_kind, device=device)
    else:
        depth = _spec_judge(depth_judge, "depth", device) if depth_judge is not None else default("depth")
    if feature_judge is None or feature_judge == seg_judge:
        feats = seg
    else:
        feats = _spec_judge(feature_judge, None, device)
    return Judges(seg, depth, feats, str(label_map) if isinstance(label_map, (str, Path)) else None)


def judges_from_args(a: Any, num_classes: int | None = None, base_name: str | None = "shapes32") -> Judges:
    """:func:`build_judges` from ``mcm evaluate``'s arguments; ``base_name``: the base whose shipped judges are
    the defaults."""
    return build_judges(getattr(a, "segmenter", None), getattr(a, "label_map", None),
                        getattr(a, "depth_model", None), base_name=base_name, seg_judge=getattr(a, "seg_judge", None),
                        depth_judge=getattr(a, "depth_judge", None), feature_judge=getattr(a, "feature_judge", None),
                        num_classes=num_classes, depth_kind=getattr(a, "depth_kind", "auto"),
                        device=getattr(a, "device", "cpu"))
