"""``depth``: 1 channel float in [0, 1], 0 = nearest (docs/plugins.md).

Shard key ``depth.png``: 16-bit PNG (value / 65535) or 8-bit (value / 255).  ``derive`` needs a
local depth model (``annotator=``, ``modalities.annotators.load_depth_model``, which documents how
its output becomes this convention); without one a shard lacking ``depth.png`` cannot provide it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from .base import Modality, png_bytes_to_array

#: slack on the [0, 1] range for values that went through resampling or float16
RANGE_EPS = 1e-4


@lru_cache(maxsize=1)
def _magma_lut() -> torch.Tensor:
    """``(256, 3)`` float RGB of matplotlib's "magma" (dark to bright)."""
    import matplotlib  # lazy: only drawing needs it

    return torch.tensor(matplotlib.colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3], dtype=torch.float32)


class Depth(Modality):
    """Depth map ``(B, 1, H, W)`` float32 in [0, 1], 0 = nearest.

    Args:
        feature_channels (int, default 16): MCM feature channels produced by the encoder.
        encoder_hidden (int, default 32): hidden width of the encoder.
        noise_std (float, default 0.01): training: std of additive gaussian noise.
        max_gamma (float, default 1.25): training: depth ** gamma with log-uniform gamma in [1/max_gamma, max_gamma]
            (monotone, keeps 0 nearest and 1 farthest).
    """

    name = "depth"
    shard_keys = ("depth.png",)
    #: ``derive`` works only with a model passed as ``annotator=`` (not from the image alone)
    needs_annotator = True

    def __init__(
        self, feature_channels: int = 16, encoder_hidden: int = 32, noise_std: float = 0.01, max_gamma: float = 1.25
    ):
        super().__init__(feature_channels, encoder_hidden)
        if max_gamma < 1:
            raise ValueError(f"modality '{self.name}': max_gamma must be >= 1, got {max_gamma}")
        self.noise_std = noise_std
        self.max_gamma = max_gamma

    @property
    def channels(self) -> int:
        return 1

    def shard_format(self) -> str:
        return "'depth.png': a greyscale 16-bit (or 8-bit) PNG, 0 = nearest, at the image's size"

    def decode(self, sample: Mapping[str, Any]) -> torch.Tensor | None:
        if "depth.png" not in sample:
            return None
        arr = png_bytes_to_array(sample["depth.png"], f"modality '{self.name}', key 'depth.png'")
        if arr.ndim == 3:  # grey stored as RGB(A): take the first channel if they agree
            if not (arr[..., :3] == arr[..., :1]).all():
                self._fail("a greyscale depth PNG", f"a colour image of shape {arr.shape}")
            arr = arr[..., 0]
        if arr.dtype == np.uint16:
            top = 65535.0
        elif arr.dtype == np.uint8:
            top = 255.0
        else:
            self._fail("an 8- or 16-bit depth PNG", f"dtype {arr.dtype}")
        return torch.from_numpy(arr.astype(np.float32) / top)[None]  # (1, H, W)

    def derive(self, image: torch.Tensor, sample: Mapping[str, Any], annotator: Any = None) -> torch.Tensor:
        """Depth ``(1, H, W)`` in [0, 1] (0 = nearest) of a local depth model, validated; none without one.
        A batch ``(B, 3, H, W)`` of same-size images gives ``(B, 1, H, W)`` in one model call."""
        if annotator is None:
            return super().derive(image, sample)
        depth = annotator.depth(image if image.ndim == 4 else image[None]).float()
        self.validate(depth)
        return depth if image.ndim == 4 else depth[0]

    def augment(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random monotone gamma, then small gaussian noise, clamped to [0, 1]."""
        log_g = (torch.rand(1, generator=generator).item() * 2 - 1) * float(np.log(self.max_gamma))
        noise = torch.randn(raw.shape, generator=generator).to(raw.device) * self.noise_std
        return (raw.clamp(0, 1) ** float(np.exp(log_g)) + noise).clamp(0, 1)

    def validate(self, x: torch.Tensor) -> None:
        self._check_batch(x, 4, "(B, 1, H, W)")
        if x.shape[1] != 1:
            self._fail("shape (B, 1, H, W)", f"shape {tuple(x.shape)}")
        if not x.is_floating_point():
            self._fail("a float map in [0, 1]", f"dtype {x.dtype}")
        self._check_finite(x)
        lo, hi = x.min().item(), x.max().item()
        if lo < -RANGE_EPS or hi > 1 + RANGE_EPS:
            self._fail("depth in [0, 1] (0 = nearest)", f"values in [{lo:.4g}, {hi:.4g}]")

    def to_channels(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.float().clamp(0, 1)  # (B, 1, H, W)

    def visualize(self, raw: torch.Tensor) -> torch.Tensor:
        # (B, 1, H, W) -> (B, 3, H, W): magma with near = bright
        idx = ((1 - raw[:, 0].float().clamp(0, 1)) * 255).round().long()
        return _magma_lut().to(raw.device)[idx].permute(0, 3, 1, 2).contiguous()

    def example(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Smooth random depth: a coarse random grid upsampled bilinearly, ``(B, 1, H, W)`` in [0, 1]."""
        coarse = torch.rand(batch, 1, 4, 4, generator=generator)
        return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True).clamp(0, 1)
