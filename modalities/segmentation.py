"""``segmentation``: integer class labels 0..K-1, one-hot into K channels (design.md §5).

Shard key ``seg.png`` holds uint8 class ids (for the ``shapes`` dataset: 0 background,
1 circle, 2 square, 3 triangle, 4 ring, 5 cross).
"""
from __future__ import annotations

import colorsys
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from .base import Modality, png_bytes_to_array

#: RGB in [0, 1] of classes 0..5; class 0 (background) dark grey, the rest bright and distinct.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.25, 0.25, 0.25),  # 0 background
    (0.90, 0.15, 0.15),  # 1 red
    (0.15, 0.75, 0.25),  # 2 green
    (0.20, 0.40, 0.95),  # 3 blue
    (1.00, 0.85, 0.10),  # 4 yellow
    (0.85, 0.25, 0.90),  # 5 magenta
)


def class_colors(num_classes: int) -> torch.Tensor:
    """``(num_classes, 3)`` float RGB: the fixed palette, then golden-ratio hues (deterministic)."""
    colors = list(PALETTE[:num_classes])
    for i in range(len(colors), num_classes):
        colors.append(colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.7, 0.95))
    return torch.tensor(colors, dtype=torch.float32)


def _is_integer_dtype(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


class Segmentation(Modality):
    """Semantic label map ``(B, H, W)`` int64 with values 0..num_classes-1.

    Args:
        num_classes (int, default 6): number of classes K; ``to_channels`` is K one-hot channels.
        feature_channels (int, default 16): MCM feature channels produced by the encoder.
        encoder_hidden (int, default 32): hidden width of the encoder.
    """

    name = "segmentation"
    is_label_map = True
    shard_keys = ("seg.png",)
    #: ``derive`` works only with a model passed as ``annotator=`` (not from the image alone)
    needs_annotator = True

    def __init__(self, num_classes: int = 6, feature_channels: int = 16, encoder_hidden: int = 32):
        super().__init__(feature_channels, encoder_hidden)
        if num_classes < 1:
            raise ValueError(f"modality '{self.name}': num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    @property
    def channels(self) -> int:
        return self.num_classes

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, **super().config()}

    # ---- data ---------------------------------------------------------------------------
    def _decode_key(self, sample: Mapping[str, Any], key: str) -> torch.Tensor | None:
        """PNG bytes of class ids under ``key`` -> ``(H, W)`` int64, validated; ``None`` if absent."""
        if key not in sample:
            return None
        arr = png_bytes_to_array(sample[key], f"modality '{self.name}', key '{key}'")
        if arr.ndim == 3 and (arr == arr[..., :1]).all():  # grey stored as RGB(A)
            arr = arr[..., 0]
        if arr.ndim != 2:
            self._fail(f"a single-channel PNG of class ids under '{key}'", f"array of shape {arr.shape}")
        labels = torch.from_numpy(np.asarray(arr, dtype=np.int64))
        self.validate(labels[None])
        return labels

    def shard_format(self) -> str:
        return (f"'{self.shard_keys[0]}': a single-channel 8- or 16-bit PNG of class ids 0..{self.num_classes - 1} "
                "at the image's size")

    def decode(self, sample: Mapping[str, Any]) -> torch.Tensor | None:
        return self._decode_key(sample, "seg.png")

    def derive(self, image: torch.Tensor, sample: Mapping[str, Any], annotator: Any = None) -> torch.Tensor:
        """Labels ``(H, W)`` int64 of a local segmenter (``modalities.annotators.load_segmenter``), validated.

        Without ``annotator`` there is nothing to derive from: the base class's error.
        """
        if annotator is None:
            return super().derive(image, sample)
        labels = annotator.segment(image[None])[0].long()
        self.validate(labels[None])
        return labels

    # ---- checks -------------------------------------------------------------------------
    @property
    def _label_rule(self) -> str:
        return f"labels in 0..{self.num_classes - 1} (num_classes={self.num_classes})"

    def _invalid_labels(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of pixels whose label is not allowed; ``x`` is int64."""
        return (x < 0) | (x >= self.num_classes)

    def validate(self, x: torch.Tensor) -> None:
        self._check_batch(x, 3, "(B, H, W)")
        if not _is_integer_dtype(x):
            self._fail("an integer label map (int64 or uint8)", f"dtype {x.dtype}")
        x = x.long()
        bad = self._invalid_labels(x)
        if bad.any():
            found = torch.unique(x[bad])[:8].tolist()
            self._fail(self._label_rule, f"labels {found} at {int(bad.sum())} pixel(s)")

    # ---- model side ---------------------------------------------------------------------
    def to_channels(self, raw: torch.Tensor) -> torch.Tensor:
        # (B, H, W) -> (B, K, H, W)
        return F.one_hot(raw.long(), self.num_classes).permute(0, 3, 1, 2).float()

    def visualize(self, raw: torch.Tensor) -> torch.Tensor:
        # (B, H, W) -> (B, 3, H, W); labels out of range are drawn black
        colors = class_colors(self.num_classes).to(raw.device)
        raw = raw.long()
        ok = (raw >= 0) & (raw < self.num_classes)
        rgb = colors[raw.clamp(0, self.num_classes - 1)] * ok[..., None]
        return rgb.permute(0, 3, 1, 2).contiguous()

    def example(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Blocky random layouts: labels drawn on a grid of 4x4-pixel cells, ``(B, H, W)`` int64."""
        cells = torch.randint(0, self.num_classes, (batch, -(-height // 4), -(-width // 4)), generator=generator)
        return cells.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :height, :width].contiguous()
