"""``sketch``: 1 channel, strokes = 1 on 0 background (docs/plugins.md).

Shard key ``sketch.png`` (greyscale; dark-on-white drawings are inverted).  When absent the
sketch is derived from the image with kornia's Canny detector (Canny 1986, "A computational
approach to edge detection"), run on each RGB channel so that outlines between colours of
similar brightness are kept; :func:`detect_edges` is the same detector for evaluation.

Sketches "with varying levels of detail" (Ham et al. 2023) are opt-in training augmentations:
``detail_levels`` derives each training sketch at a Canny threshold pair drawn per sample (sparse
to dense), ``stroke_width_range`` thins / thickens strokes (kornia morphology; the augmentation
for shards that ship their own ``sketch.png``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from kornia.filters import canny
from kornia.morphology import dilation, erosion
from torch.nn import functional as F

from .base import Modality, png_bytes_to_array
from .sketch_regions import DEFAULT_HINTS, HINTS, region_hints

#: slack on the [0, 1] range for values that went through resampling or float16
RANGE_EPS = 1e-4


@torch.no_grad()
def detect_edges(
    images: torch.Tensor, low_threshold: float = 0.3, high_threshold: float = 0.6, sigma: float = 1.0
) -> torch.Tensor:
    """Binary edge maps ``(B, 1, H, W)`` in {0, 1} of RGB ``images`` ``(B, 3, H, W)`` in [0, 1].

    Canny with hysteresis (kornia) on each colour channel separately; a pixel is an edge if
    it is one in any channel.  Thresholds apply to the smoothed gradient magnitude; the defaults
    (0.3, 0.6) were tuned on 32x32 ``shapes``: 96% of edge pixels lie within 1 px of an object
    boundary and 99% of boundary pixels have an edge within 1 px (0.1 / 0.2 traces background noise).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"detect_edges: images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    k = 2 * int(np.ceil(2 * sigma)) + 1  # kernel covers +-2 sigma
    _, edges = canny(images.float().reshape(b * 3, 1, h, w), low_threshold, high_threshold, (k, k), (sigma, sigma))
    return edges.reshape(b, 3, h, w).amax(dim=1, keepdim=True)


class Sketch(Modality):
    """Stroke map ``(B, 1, H, W)`` float32 in [0, 1], strokes = 1.

    Args:
        feature_channels (int, default 16): MCM feature channels produced by the encoder.
        encoder_hidden (int, default 32): hidden width of the encoder.
        low_threshold (float, default 0.3): Canny low (hysteresis) threshold for ``derive``.
        high_threshold (float, default 0.6): Canny high threshold for ``derive``.
        sigma (float, default 1.0): Canny gaussian smoothing for ``derive``.
        max_dropout (float, default 0.3): training: stroke blocks are dropped with a probability
            drawn uniformly in [0, max_dropout] per sample.
        dilate_prob (float, default 0.3): training: probability of thickening strokes by a 3x3 dilation.
        detail_levels (list of [low, high] Canny threshold pairs, default None = off): training, when the
            shard has no ``sketch.png``: the sketch is derived at a pair drawn uniformly per sample from
            this list (e.g. ``[[0.45, 0.9], [0.3, 0.6], [0.15, 0.3]]``: sparse, default, dense) instead of
            at ``(low_threshold, high_threshold)``.  Validation always uses the fixed pair.
        stroke_width_range (pair of int, default None = off): training: per sample, strokes are thickened
            (``n > 0``: n 3x3 dilations) or thinned (``n < 0``: |n| 3x3 erosions) with ``n`` drawn uniformly
            in ``[low, high]``; meant for drawn ``sketch.png`` strokes (erosion removes 1-pixel Canny edges).
        region_hints (bool or list of names, default False): the encoder also sees fixed inside tests of the
            strokes (:mod:`modalities.sketch_regions`), one input channel each: ``true`` is
            ``["enclosed", "crossing_parity"]`` (flood-fill enclosure, ray-crossing parity); a list names them
            from :data:`~modalities.sketch_regions.HINTS` (also ``"enclosed_open_border"``: the flood with two
            adjacent border sides closed, for shapes the border cuts).  Off by default so modules trained
            before it load unchanged.
    """

    name = "sketch"
    shard_keys = ("sketch.png",)

    def __init__(
        self,
        feature_channels: int = 16,
        encoder_hidden: int = 32,
        low_threshold: float = 0.3,
        high_threshold: float = 0.6,
        sigma: float = 1.0,
        max_dropout: float = 0.3,
        dilate_prob: float = 0.3,
        detail_levels: list[tuple[float, float]] | None = None,
        stroke_width_range: tuple[int, int] | None = None,
        region_hints: bool | list[str] = False,
    ):
        super().__init__(feature_channels, encoder_hidden)
        self.region_hints = region_hints
        self.hint_names = self._hint_names(region_hints)
        if not 0 < low_threshold < high_threshold:
            raise ValueError(
                f"modality '{self.name}': need 0 < low_threshold < high_threshold, got {low_threshold}, {high_threshold}"
            )
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.sigma = sigma
        self.max_dropout = max_dropout
        self.dilate_prob = dilate_prob
        self.detail_levels = None if detail_levels is None else [self._threshold_pair(p) for p in detail_levels]
        if self.detail_levels == []:
            raise ValueError(f"modality '{self.name}': detail_levels must hold at least one [low, high] pair "
                             "(or be None: off)")
        self.stroke_width_range = None
        if stroke_width_range is not None:
            lo, hi = (int(v) for v in stroke_width_range)
            if lo > hi:
                raise ValueError(f"modality '{self.name}': stroke_width_range must be (low, high) with low <= high, "
                                 f"got {tuple(stroke_width_range)}")
            self.stroke_width_range = (lo, hi)

    def _threshold_pair(self, pair: Any) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"modality '{self.name}': detail_levels: expected [low, high] pairs, "
                             f"got {pair!r}") from None
        if not 0 < lo < hi:
            raise ValueError(f"modality '{self.name}': detail_levels: need 0 < low < high, got {pair!r}")
        return lo, hi

    def _hint_names(self, region_hints: Any) -> tuple[str, ...]:
        if isinstance(region_hints, bool):
            return DEFAULT_HINTS if region_hints else ()
        names = region_hints if isinstance(region_hints, (list, tuple)) else ()
        if names and all(isinstance(n, str) and n in HINTS for n in names) and len(set(names)) == len(names):
            return tuple(names)
        raise ValueError(f"modality '{self.name}': region_hints must be true, false or a list of distinct hint "
                         f"names from {sorted(HINTS)}, got {region_hints!r}")

    @property
    def channels(self) -> int:
        return 1 + len(self.hint_names)

    @property
    def raw_channels(self) -> int:
        return 1  # the strokes; region hints are computed from them

    # ---- data ---------------------------------------------------------------------------
    def shard_format(self) -> str:
        return "'sketch.png': a greyscale PNG of strokes at the image's size (or none: derived from the image)"

    def decode(self, sample: Mapping[str, Any]) -> torch.Tensor | None:
        if "sketch.png" not in sample:
            return None
        arr = png_bytes_to_array(sample["sketch.png"], f"modality '{self.name}', key 'sketch.png'")
        # the dtype decides the scale: 1-bit PNGs decode as bool (strokes 1), 16-bit as uint16
        top = {np.dtype(bool): 1.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 255.0)
        x = arr.astype(np.float32) / top
        if x.ndim == 3:  # RGB(A) -> grey
            x = x[..., :3].mean(-1)
        if x.mean() > 0.5:  # dark strokes on white paper
            x = 1.0 - x
        return torch.from_numpy(np.ascontiguousarray(x))[None]  # (1, H, W)

    def derive(self, image: torch.Tensor, sample: Mapping[str, Any]) -> torch.Tensor:
        """Canny edges of the RGB image ``(3, H, W)`` in [0, 1] -> ``(1, H, W)`` in {0, 1}."""
        return detect_edges(image[None], self.low_threshold, self.high_threshold, self.sigma)[0]

    def derive_for_data(self, image: torch.Tensor, sample: Mapping[str, Any]) -> torch.Tensor:
        """With ``detail_levels``: ``(1 + L, H, W)``, the sketch at the fixed pair then at each level (for
        :meth:`augment` to draw from and :meth:`eval_transform` to take the first); else :meth:`derive`."""
        if self.detail_levels is None:
            return self.derive(image, sample)
        pairs = [(self.low_threshold, self.high_threshold), *self.detail_levels]
        return torch.cat([detect_edges(image[None], lo, hi, self.sigma)[0] for lo, hi in pairs])

    def pick_detail_level(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(1 + L, H, W)`` candidates -> ``(1, H, W)`` at a level drawn uniformly; a ``(1, H, W)`` sketch as is."""
        if self.detail_levels is None or raw.ndim != 3 or raw.shape[0] == 1:  # levels off, or a sketch.png
            return raw
        i = 1 + int(torch.randint(0, raw.shape[0] - 1, (1,), generator=generator))
        return raw[i:i + 1]

    def change_stroke_width(self, raw: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` 3x3 dilations (> 0, thicker) or erosions (< 0, thinner) of ``(1, H, W)`` strokes."""
        if steps == 0:
            return raw
        op = dilation if steps > 0 else erosion
        kernel = torch.ones(3, 3, device=raw.device, dtype=raw.dtype)
        x = raw[None]  # (1, 1, H, W)
        for _ in range(abs(steps)):
            x = op(x, kernel, border_type="constant", border_value=0.0)  # nothing beyond the border
        return x[0]

    def eval_transform(self, raw: torch.Tensor, key: str) -> torch.Tensor:
        # derived candidates (detail_levels): the fixed pair; else the sketch itself
        return raw[:1] if raw.ndim == 3 and raw.shape[0] > 1 else raw

    def augment(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A detail level (``detail_levels``), a stroke width (``stroke_width_range``), occasional 3x3 dilation
        (thicker strokes), then dropout of random 2x2 stroke blocks."""
        x = self.pick_detail_level(raw.float(), generator)
        if self.stroke_width_range is not None:
            lo, hi = self.stroke_width_range
            x = self.change_stroke_width(x, int(torch.randint(lo, hi + 1, (1,), generator=generator)))
        if torch.rand(1, generator=generator).item() < self.dilate_prob:
            x = F.max_pool2d(x, 3, stride=1, padding=1)
        p = torch.rand(1, generator=generator).item() * self.max_dropout
        h, w = x.shape[-2:]
        keep = torch.rand(*x.shape[:-2], -(-h // 2), -(-w // 2), generator=generator) >= p
        keep = keep.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w]
        return x * keep.to(x.device, x.dtype)

    # ---- checks / model side ------------------------------------------------------------
    def validate(self, x: torch.Tensor) -> None:
        self._check_batch(x, 4, "(B, 1, H, W)")
        if x.shape[1] != 1:
            self._fail("shape (B, 1, H, W)", f"shape {tuple(x.shape)}")
        if not x.is_floating_point():
            self._fail("a float map in [0, 1] (strokes = 1)", f"dtype {x.dtype}")
        self._check_finite(x)
        lo, hi = x.min().item(), x.max().item()
        if lo < -RANGE_EPS or hi > 1 + RANGE_EPS:
            self._fail("strokes in [0, 1] (strokes = 1, background = 0)", f"values in [{lo:.4g}, {hi:.4g}]")

    def to_channels(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.float().clamp(0, 1)  # (B, 1, H, W)
        return torch.cat([x, region_hints(x, self.hint_names)], dim=1) if self.hint_names else x

    def loss_weight_map(self, raw: torch.Tensor) -> torch.Tensor:
        """Within 1 pixel of a stroke (the sketch judge's tolerance): the few pixels a sketch decides."""
        return F.max_pool2d(raw.float().clamp(0, 1), 3, stride=1, padding=1)

    def visualize(self, raw: torch.Tensor) -> torch.Tensor:
        # black strokes on white: (B, 1, H, W) -> (B, 3, H, W)
        return (1 - raw.float().clamp(0, 1)).expand(-1, 3, -1, -1).contiguous()

    def example(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Strokes along the borders of random 4x4-pixel blocks, ``(B, 1, H, W)`` in {0, 1}."""
        cells = torch.randint(0, 3, (batch, -(-height // 4), -(-width // 4)), generator=generator)
        lab = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :height, :width]
        x = torch.zeros(batch, 1, height, width)
        x[:, 0, :, 1:] += (lab[:, :, 1:] != lab[:, :, :-1]).float()
        x[:, 0, 1:, :] += (lab[:, 1:, :] != lab[:, :-1, :]).float()
        return x.clamp(0, 1)
