"""``segmentation``: integer class labels 0..K-1, one-hot into K channels (docs/plugins.md).

Shard key ``seg.png`` holds uint8 class ids (for the ``shapes`` dataset: 0 background,
1 circle, 2 square, 3 triangle, 4 ring, 5 cross).  Soft maps — class probabilities
``(B, K, H, W)`` float summing to 1 per pixel, e.g. a segmenter's softmax
(``modalities.annotators``) — are accepted wherever hard maps are ("hard or soft segmentation
maps", Ham et al. 2023) and are the one-hot channels as they are; a one-hot probability map is
exactly its hard map.  Training can soften hard maps at object boundaries (``soft_prob``).
"""
from __future__ import annotations

import colorsys
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from .base import Modality, one_hot_channels, png_bytes_to_array

#: how far a pixel's class probabilities may sum from 1 (float16 softmax, resampling)
PROB_TOL = 1e-3
#: slack on the [0, 1] range of probabilities
RANGE_EPS = 1e-4

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


def is_soft(raw: torch.Tensor) -> bool:
    """Is this raw label-map-like tensor soft (float class probabilities) rather than class ids?"""
    return raw.is_floating_point()


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D gaussian over +-ceil(2 sigma) pixels (the support ``detect_edges`` uses)."""
    radius = max(1, int(np.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_maps(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ``(..., C, H, W)`` float maps, reflect padding (rows of a probability map
    keep summing to 1: the kernel sums to 1 and the padding only repeats pixels)."""
    k = gaussian_kernel1d(sigma).to(x.device, x.dtype)
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])
    h, w = shape[-2:]
    r = min(len(k) // 2, h - 1, w - 1)  # reflect padding needs pad < size (tiny maps)
    if r < 1:
        return x
    k = k[len(k) // 2 - r: len(k) // 2 + r + 1]
    k = k / k.sum()
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(shape)


class Segmentation(Modality):
    """Semantic label map ``(B, H, W)`` int64 with values 0..num_classes-1, or soft class
    probabilities ``(B, K, H, W)`` float in [0, 1] summing to 1 per pixel (tolerance ``PROB_TOL``).

    Args:
        num_classes (int, default 6): number of classes K; ``to_channels`` is K one-hot channels
            (a soft map's probabilities, as they are).
        feature_channels (int, default 16): MCM feature channels produced by the encoder.
        encoder_hidden (int, default 32): hidden width of the encoder.
        soft_prob (float, default 0.0 = off): training augmentation: per sample, the probability of
            softening the hard map at object boundaries (its one-hot blurred by a gaussian of sigma
            drawn uniformly in ``soft_sigma``), so the MCM also learns soft maps.  When > 0 every
            training sample comes out as probabilities (the unsoftened ones one-hot: the same
            channels) so that a batch stacks; at 0 ``augment`` returns the map untouched and draws
            nothing.  Validation maps stay hard.
        soft_sigma (pair of float, default (0.5, 1.5)): range of the blur's sigma in pixels.
    """

    name = "segmentation"
    is_label_map = True
    accepts_probabilities = True
    shard_keys = ("seg.png",)
    #: ``derive`` works only with a model passed as ``annotator=`` (not from the image alone)
    needs_annotator = True

    def __init__(self, num_classes: int = 6, feature_channels: int = 16, encoder_hidden: int = 32,
                 soft_prob: float = 0.0, soft_sigma: tuple[float, float] = (0.5, 1.5)):
        super().__init__(feature_channels, encoder_hidden)
        if num_classes < 1:
            raise ValueError(f"modality '{self.name}': num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        if not 0.0 <= soft_prob <= 1.0:
            raise ValueError(f"modality '{self.name}': soft_prob must be in [0, 1], got {soft_prob}")
        lo, hi = (float(v) for v in soft_sigma)
        if not 0 < lo <= hi:
            raise ValueError(f"modality '{self.name}': soft_sigma must be (low, high) with 0 < low <= high, "
                             f"got {tuple(soft_sigma)}")
        self.soft_prob = float(soft_prob)
        self.soft_sigma = (lo, hi)

    @property
    def channels(self) -> int:
        return self.num_classes

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
        """Labels ``(H, W)`` int64 of a local segmenter (``modalities.annotators.load_segmenter``), validated;
        a batch ``(B, 3, H, W)`` of same-size images gives ``(B, H, W)`` in one segmenter call.

        Without ``annotator`` there is nothing to derive from: the base class's error.
        """
        if annotator is None:
            return super().derive(image, sample)
        labels = annotator.segment(image if image.ndim == 4 else image[None]).long()
        self.validate(labels)
        return labels if image.ndim == 4 else labels[0]

    def augment(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Off by default (the map untouched); with ``soft_prob`` > 0 see :meth:`soften`."""
        return self.soften(raw, generator) if self.soft_prob > 0 else raw

    def soften(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(H, W)`` labels or ``(K, H, W)`` probabilities -> ``(K, H, W)`` probabilities, blurred with
        probability ``soft_prob`` by a gaussian of sigma uniform in ``soft_sigma`` (label smoothing at
        boundaries; pixels far from any boundary stay one-hot)."""
        probs = raw.float() if is_soft(raw) else F.one_hot(raw.long(), self.num_classes).permute(2, 0, 1).float()
        if torch.rand(1, generator=generator).item() < self.soft_prob:
            lo, hi = self.soft_sigma
            sigma = lo + (hi - lo) * torch.rand(1, generator=generator).item()
            probs = blur_maps(probs, sigma)
        return probs

    # ---- checks -------------------------------------------------------------------------
    @property
    def _label_rule(self) -> str:
        return f"labels in 0..{self.num_classes - 1} (num_classes={self.num_classes})"

    def _invalid_labels(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of pixels whose label is not allowed; ``x`` is int64."""
        return (x < 0) | (x >= self.num_classes)

    def validate(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4:
            return self._validate_probabilities(x)
        self._check_batch(x, 3, "(B, H, W)")
        if not _is_integer_dtype(x):
            self._fail(f"an integer label map (int64 or uint8) (B, H, W), or class probabilities "
                       f"(B, K={self.num_classes}, H, W) float", f"dtype {x.dtype} of shape {tuple(x.shape)}")
        x = x.long()
        bad = self._invalid_labels(x)
        if bad.any():
            found = torch.unique(x[bad])[:8].tolist()
            self._fail(self._label_rule, f"labels {found} at {int(bad.sum())} pixel(s)")

    #: what the rows of a soft map must sum to, for error messages (partial_mask: 1 or 0)
    _row_rule = "class probabilities summing to 1 at every pixel"

    def _bad_rows(self, sums: torch.Tensor) -> torch.Tensor:
        """Pixels whose probabilities' sum is not allowed."""
        return (sums - 1).abs() > PROB_TOL

    def _validate_probabilities(self, x: torch.Tensor) -> None:
        layout = f"(B, K={self.num_classes}, H, W)"
        self._check_batch(x, 4, layout)
        if x.shape[1] != self.num_classes:
            self._fail(f"class probabilities {layout} (num_classes={self.num_classes})", f"shape {tuple(x.shape)}")
        self._check_finite(x)
        lo, hi = x.min().item() + 0.0, x.max().item() + 0.0  # + 0.0: no "-0"
        if lo < -RANGE_EPS or hi > 1 + RANGE_EPS:
            self._fail(f"class probabilities in [0, 1] {layout}", f"values in [{lo:.4g}, {hi:.4g}] in a map of "
                       f"shape {tuple(x.shape)}")
        sums = x.double().sum(1)  # (B, H, W)
        bad = self._bad_rows(sums)
        if bad.any():
            b, i, j = (int(v) for v in bad.nonzero()[0])
            self._fail(f"{self._row_rule} (tolerance {PROB_TOL:g}) {layout}",
                       f"sums in [{sums[bad].min().item():.4g}, {sums[bad].max().item():.4g}] at {int(bad.sum())} "
                       f"pixel(s) of a map of shape {tuple(x.shape)}, e.g. {sums[b, i, j].item():.4g} at "
                       f"(b={b}, y={i}, x={j})")

    # ---- model side ---------------------------------------------------------------------
    def to_channels(self, raw: torch.Tensor) -> torch.Tensor:
        if is_soft(raw):  # (B, K, H, W) probabilities: already the (soft) one-hot
            # in the hard path's memory layout (one_hot + permute = channels-last), so that the encoder's
            # convs run the same kernels and a one-hot probability map gives bit-identical features
            return raw.float().contiguous(memory_format=torch.channels_last)
        # (B, H, W) -> (B, K, H, W)
        return one_hot_channels(raw, self.num_classes)

    def resize(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Hard maps nearest; probabilities bilinear (antialiased: weights >= 0 summing to 1, so rows still
        sum to 1)."""
        if not is_soft(raw) or tuple(raw.shape[-2:]) == tuple(size):
            return super().resize(raw, size)
        return F.interpolate(raw.float(), size=size, mode="bilinear", antialias=True, align_corners=False)

    def visualize(self, raw: torch.Tensor) -> torch.Tensor:
        # (B, H, W) -> (B, 3, H, W); labels out of range are drawn black
        colors = class_colors(self.num_classes).to(raw.device)
        if is_soft(raw):  # probability-weighted palette
            return torch.einsum("bkhw,kc->bchw", raw.float().clamp(0, 1), colors).clamp(0, 1).contiguous()
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
