"""``JudgeUNet``: the small network behind the shipped ``shapes32`` judges.

A plain four-level UNet (Ronneberger et al. 2015, "U-Net: convolutional networks for
biomedical image segmentation") small enough to ship (< 2 MB) and to train on CPU in minutes.
One class serves both judges: ``task="segmentation"`` outputs class logits,
``task="depth"`` a sigmoid depth map in [0, 1] (0 = nearest).  Saved like every model in
this project: ``config.json`` + safetensors (diffusers ``ModelMixin``).

Inputs are RGB images ``(B, 3, H, W)`` in [0, 1] at any size: they are resized to the
judge's ``image_size`` and predictions are resized back, so a 32x32 judge also reads 16x16
test images and 64x64 samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

TASKS = ("segmentation", "depth")


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class JudgeUNet(ModelMixin, ConfigMixin):
    """A small UNet judge.

    Args:
        task (str, default "segmentation"): ``"segmentation"`` (class logits) or ``"depth"`` (sigmoid map).
        num_classes (int, default 6): output classes for segmentation (ignored for depth).
        widths (tuple[int, ...], default (16, 32, 64, 96)): channels per level; each level halves the size.
        image_size (int, default 32): the resolution it was trained at; inputs are resized to it.
        class_names (tuple[str, ...] | None, default None): names of the classes, for reports.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, task: str = "segmentation", num_classes: int = 6, widths: tuple[int, ...] = (16, 32, 64, 96),
                 image_size: int = 32, class_names: tuple[str, ...] | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        if image_size % 2 ** (len(widths) - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2**{len(widths) - 1} for widths={widths}")
        self.down = nn.ModuleList([_block(cin, cout) for cin, cout in zip((3,) + tuple(widths[:-1]), widths)])
        self.up = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i])
                                 for i in reversed(range(len(widths) - 1))])
        self.head = nn.Conv2d(widths[0], num_classes if task == "segmentation" else 1, 1)

    @property
    def num_features(self) -> int:
        """Size of :meth:`features` (torchmetrics' FID reads this attribute)."""
        return self.config.widths[-1]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"judge: images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        if not images.is_floating_point():  # uint8 in [0, 255]
            images = images.float() / 255.0
        images = images.to(self.head.weight.dtype)
        s = self.config.image_size
        if tuple(images.shape[-2:]) != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return images * 2 - 1  # (B, 3, s, s) in [-1, 1]

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        skips, h = [], self._prepare(images)
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        return skips  # full resolution first, bottleneck last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw output at the judge's resolution: ``(B, K, s, s)`` logits or ``(B, 1, s, s)`` pre-sigmoid depth."""
        skips = self._encode(images)
        h = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = block(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip], dim=1))
        return self.head(h)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Labels ``(B, H, W)`` int64 or depth ``(B, 1, H, W)`` in [0, 1], at the input's size."""
        size = tuple(images.shape[-2:])
        out = self(images).float()
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out.argmax(1) if self.config.task == "segmentation" else torch.sigmoid(out)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled bottleneck features ``(B, widths[-1])``: the judge's feature space for FID/KID."""
        return self._encode(images)[-1].float().mean(dim=(2, 3))
