"""Evaluation metrics: spatial alignment per modality, image quality, diversity, text alignment.

Each metric exists twice, as in torchmetrics: a ``Metric`` subclass that accumulates over
batches (and syncs across processes), and a plain function for one batch.

=================  ==================================  ===================================
what               Metric                              function
=================  ==================================  ===================================
segmentation       ``SegmentationAlignment``           ``segmentation_alignment``
partial mask       ``SegmentationAlignment(K, 255)``   ``partial_alignment``
sketch             ``SketchAlignment``                 ``sketch_alignment``, ``edge_alignment``
depth              ``DepthAlignment``                  ``depth_alignment``, ``ssi_rmse``, ``delta_accuracy``
diversity          ``Diversity``                       ``diversity``
FID / KID          ``judge_fid``, ``judge_kid``,       ``frechet_distance``
                   ``inception_fid``
CLIP score         ``CLIPScore``                       ``clip_score``
=================  ==================================  ===================================
"""
from .clip import CLIPScore, clip_score, clip_scores, load_open_clip
from .depth import DepthAlignment, align_scale_shift, delta_accuracy, depth_alignment, ssi_rmse
from .diversity import Diversity, diversity, pairwise_distances
from .quality import JudgeFeatures, SeededKID, frechet_distance, inception_fid, judge_fid, judge_kid
from .segmentation import (
    UNKNOWN, SegmentationAlignment, confusion_matrix, iou_per_class, miou_from_confusion, partial_alignment,
    pixel_accuracy_from_confusion, segmentation_alignment,
)
from .sketch import SketchAlignment, dilate, edge_alignment, edge_counts, plugin_edges, sketch_alignment

__all__ = [
    "CLIPScore", "clip_score", "clip_scores", "load_open_clip",
    "DepthAlignment", "align_scale_shift", "delta_accuracy", "depth_alignment", "ssi_rmse",
    "Diversity", "diversity", "pairwise_distances",
    "JudgeFeatures", "SeededKID", "frechet_distance", "inception_fid", "judge_fid", "judge_kid",
    "UNKNOWN", "SegmentationAlignment", "confusion_matrix", "iou_per_class", "miou_from_confusion",
    "partial_alignment", "pixel_accuracy_from_confusion", "segmentation_alignment",
    "SketchAlignment", "dilate", "edge_alignment", "edge_counts", "plugin_edges", "sketch_alignment",
]
