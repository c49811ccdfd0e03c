"""``partial_mask``: a segmentation where some pixels are unknown (label 255) (docs/plugins.md).

Channels: K one-hot channels (all zero on unknown pixels) + 1 known-mask channel.  Training
maps are made from full segmentations by hiding random objects and rectangles
(:func:`hide_regions`); validation hides deterministically per sample key.

A soft partial mask is ``(B, K, H, W)`` float: where the map is known, class probabilities
summing to 1; where it is unknown, all zeros (the one-hot channels of a hard map, exactly).
Its known mask is "the row sums to 1" (sum > 0.5), so a one-hot soft map is its hard map.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from .base import one_hot_channels
from .segmentation import PROB_TOL, Segmentation, blur_maps, is_soft

UNKNOWN = 255


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(0, high, (1,), generator=generator))


def hide_regions(
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    object_prob: float = 0.5,
    rect_prob: float = 0.5,
    max_rect_fraction: float = 0.5,
) -> torch.Tensor:
    """Return a copy of ``labels`` with random regions set to ``UNKNOWN`` (255).

    Per sample, each class present is hidden with probability ``object_prob`` (all its
    pixels), and with probability ``rect_prob`` a random rectangle (each side up to
    ``max_rect_fraction`` of the map) is hidden too.  Whenever the map allows it, at least
    one class stays known and something is hidden (a rectangle is forced if nothing else was).

    Args:
        labels: ``(H, W)`` or ``(B, H, W)`` integer labels; pixels already 255 stay unknown.
        generator: seeds every random choice (``None``: torch's global RNG).
    """
    single = labels.ndim == 2
    x = labels[None] if single else labels
    out = x.clone()
    _, height, width = x.shape
    for b in range(x.shape[0]):
        known = x[b] != UNKNOWN
        classes = torch.unique(x[b][known])
        hide = torch.rand(len(classes), generator=generator) < object_prob
        if len(classes) > 0 and hide.all():  # keep one class known
            hide[_randint(len(classes), generator)] = False
        hidden = torch.isin(x[b], classes[hide.to(classes.device)])
        if torch.rand(1, generator=generator).item() < rect_prob or not hide.any():
            rh = 1 + _randint(max(1, int(height * max_rect_fraction)), generator)
            rw = 1 + _randint(max(1, int(width * max_rect_fraction)), generator)
            top, left = _randint(height - rh + 1, generator), _randint(width - rw + 1, generator)
            with_rect = hidden.clone()
            with_rect[top : top + rh, left : left + rw] = True
            if (known & ~with_rect).any():  # never hide the last known pixels
                hidden = with_rect
        out[b][hidden] = UNKNOWN
    return out[0] if single else out


class PartialMask(Segmentation):
    """Partial label map ``(B, H, W)`` int64: values 0..num_classes-1, or 255 = unknown; or soft
    ``(B, K, H, W)`` float: class probabilities summing to 1 where known, all-zero rows where unknown.

    Args:
        num_classes (int, default 6): number of classes K; ``to_channels`` gives K + 1 channels.
        feature_channels (int, default 16): MCM feature channels produced by the encoder.
        encoder_hidden (int, default 32): hidden width of the encoder.
        hide_object_prob (float, default 0.5): training: probability of hiding each class present.
        hide_rect_prob (float, default 0.5): training: probability of also hiding a random rectangle.
        soft_prob (float, default 0.0 = off): training: per sample, after hiding, the probability of
            softening the known part at its boundaries (as ``segmentation``'s; the blur is normalised over
            known pixels only, unknown rows stay zero).  When > 0 every training sample is soft.
        soft_sigma (pair of float, default (0.5, 1.5)): range of the blur's sigma in pixels.
    """

    name = "partial_mask"
    shard_keys = ("partial.png",)
    derive_keys = ("seg.png",)

    def __init__(
        self,
        num_classes: int = 6,
        feature_channels: int = 16,
        encoder_hidden: int = 32,
        hide_object_prob: float = 0.5,
        hide_rect_prob: float = 0.5,
        soft_prob: float = 0.0,
        soft_sigma: tuple[float, float] = (0.5, 1.5),
    ):
        super().__init__(num_classes, feature_channels, encoder_hidden, soft_prob, soft_sigma)
        if num_classes > UNKNOWN:
            raise ValueError(f"modality '{self.name}': num_classes must be <= {UNKNOWN} (255 = unknown), got {num_classes}")
        self.hide_object_prob = hide_object_prob
        self.hide_rect_prob = hide_rect_prob

    @property
    def channels(self) -> int:
        return self.num_classes + 1

    # ---- data ---------------------------------------------------------------------------
    def shard_format(self) -> str:
        return (f"'partial.png' (class ids 0..{self.num_classes - 1}, 255 = unknown) or 'seg.png' (class ids "
                f"0..{self.num_classes - 1}, regions hidden from it): a single-channel PNG at the image's size")

    def decode(self, sample: Mapping[str, Any]) -> torch.Tensor | None:
        return self._decode_key(sample, "partial.png")

    def derive(self, image: torch.Tensor, sample: Mapping[str, Any]) -> torch.Tensor:
        """The full segmentation from ``sample["seg.png"]`` (PNG bytes or a label array); nothing hidden yet.

        Hiding happens in :meth:`augment` (training) and :meth:`eval_transform` (validation).
        """
        seg = sample.get("seg.png")
        if seg is None:
            return super().derive(image, sample)  # raises, naming the keys
        if isinstance(seg, (bytes, bytearray)):
            return self._decode_key(sample, "seg.png")
        labels = torch.as_tensor(np.asarray(seg) if not isinstance(seg, torch.Tensor) else seg).long()
        self.validate(labels[None])
        return labels

    def _hide(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not is_soft(raw):
            return hide_regions(raw, generator, self.hide_object_prob, self.hide_rect_prob)
        # a soft map: hide regions of its argmax labels, zeroing those rows
        known = raw.sum(0) > 0.5  # (H, W)
        labels = torch.where(known, raw.argmax(0), UNKNOWN)
        hidden = hide_regions(labels, generator, self.hide_object_prob, self.hide_rect_prob) == UNKNOWN
        return raw.float() * (~hidden).float()

    def augment(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hidden = self._hide(raw, generator)
        return self.soften(hidden, generator) if self.soft_prob > 0 else hidden

    def soften(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(H, W)`` labels (255 = unknown) or ``(K, H, W)`` soft partial map -> soft partial map, blurred with
        probability ``soft_prob``: a normalised convolution over known pixels (unknown ones neither give nor
        take probability), so known rows sum to 1 and unknown rows stay 0."""
        if is_soft(raw):
            probs = raw.float()
        else:
            raw = raw.long()
            known = (raw != UNKNOWN).float()
            probs = F.one_hot(raw.where(raw != UNKNOWN, 0), self.num_classes).permute(2, 0, 1).float() * known
        if torch.rand(1, generator=generator).item() < self.soft_prob:
            lo, hi = self.soft_sigma
            sigma = lo + (hi - lo) * torch.rand(1, generator=generator).item()
            known = (probs.sum(0, keepdim=True) > 0.5).float()  # (1, H, W)
            blurred, weight = blur_maps(probs, sigma), blur_maps(known, sigma)
            probs = torch.where(known > 0, blurred / weight.clamp(min=1e-12), 0.0)
        return probs

    def eval_transform(self, raw: torch.Tensor, key: str) -> torch.Tensor:
        """Hide regions deterministically, seeded by ``zlib.crc32(key)`` (stable across processes)."""
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        return self._hide(raw, generator)

    # ---- checks / model side ------------------------------------------------------------
    @property
    def _label_rule(self) -> str:
        return f"labels in 0..{self.num_classes - 1} (num_classes={self.num_classes}) or {UNKNOWN} (unknown)"

    def _invalid_labels(self, x: torch.Tensor) -> torch.Tensor:
        return super()._invalid_labels(x) & (x != UNKNOWN)

    _row_rule = "class probabilities summing to 1 (known pixels) or all zero (unknown pixels) at every pixel"

    def _bad_rows(self, sums: torch.Tensor) -> torch.Tensor:
        return ((sums - 1).abs() > PROB_TOL) & (sums.abs() > PROB_TOL)

    def to_channels(self, raw: torch.Tensor) -> torch.Tensor:
        if is_soft(raw):  # (B, K, H, W): the probabilities (zero rows where unknown), then the known mask
            probs = raw.float().contiguous(memory_format=torch.channels_last)  # the hard path's layout
            known = (probs.sum(1, keepdim=True) > 0.5).float().contiguous()
            return torch.cat([probs * known, known], dim=1)
        # (B, H, W) -> (B, K + 1, H, W): one-hot zeroed where unknown, then the known mask
        raw = raw.long()
        known = (raw != UNKNOWN)[:, None].float()  # (B, 1, H, W)
        onehot = one_hot_channels(raw.where(raw != UNKNOWN, 0), self.num_classes)
        return torch.cat([onehot * known, known], dim=1)

    def resize(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Hard maps nearest; soft ones bilinear, with the known mask resampled too and thresholded at 1/2
        (like nearest) and known rows renormalised, so rows still sum to 1 or 0."""
        if not is_soft(raw) or tuple(raw.shape[-2:]) == tuple(size):
            return super().resize(raw, size)
        probs = super().resize(raw, size)  # bilinear; a row's sum = the resampled known fraction
        sums = probs.sum(1, keepdim=True)
        return torch.where(sums > 0.5, probs / sums.clamp(min=1e-12), 0.0)

    def visualize(self, raw: torch.Tensor) -> torch.Tensor:
        # like segmentation; unknown pixels are a white / light-grey checkerboard (4-pixel squares)
        if is_soft(raw):
            unknown = raw.float().sum(1) <= 0.5  # (B, H, W)
            rgb = super().visualize(raw)
        else:
            raw = raw.long()
            unknown = raw == UNKNOWN
            rgb = super().visualize(raw.where(raw != UNKNOWN, 0))
        h, w = raw.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing="ij")
        checker = torch.where(((yy // 4 + xx // 4) % 2) == 0, 1.0, 0.8)  # (H, W)
        return torch.where(unknown[:, None], checker, rgb)

    def example(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Blocky random layouts with some regions hidden, ``(B, H, W)`` int64."""
        full = super().example(batch, height, width, generator)
        return hide_regions(full, generator, self.hide_object_prob, self.hide_rect_prob)
