"""Text alignment: CLIP score (Hessel et al. 2021, "CLIPScore") with open_clip from a local checkpoint.

``score = 100 * max(cos(E_img(image), E_txt(text)), 0)`` per pair, averaged (torchmetrics'
convention).  The model is ``open_clip.create_model(arch, pretrained=<local file>)``; a
missing file is an error, never a download.  Architectures that open_clip does not ship
can be registered from a JSON config (``open_clip.add_model_config``), which is how the
tests build a tiny random CLIP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

# OpenAI CLIP's normalisation, used when the model carries no preprocessing config
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_open_clip(arch: str, checkpoint: str | Path, config: str | Path | None = None, device: str = "cpu"):
    """``(model, tokenizer)`` for ``arch`` with weights from the local ``checkpoint`` file.

    Args:
        arch: an open_clip architecture name (``ViT-B-32``) or the stem of ``config``.
        checkpoint: local ``.pt`` / ``.bin`` / ``.safetensors`` weights.
        config: optional JSON model config to register first (its file stem becomes an arch name).
    """
    import open_clip

    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"clip checkpoint: '{path}' is not a file; pass a local open_clip checkpoint "
                         f"(nothing is downloaded)")
    if config is not None:
        if not Path(config).is_file():
            raise ValueError(f"clip config: '{config}' is not a file")
        open_clip.add_model_config(str(config))
    if arch not in open_clip.list_models():
        raise ValueError(f"clip arch: unknown open_clip architecture {arch!r}; pass one of open_clip.list_models() "
                         f"or register yours with --clip-config CONFIG.json")
    model = open_clip.create_model(arch, pretrained=str(path), device=device)
    return model.eval(), open_clip.get_tokenizer(arch)


def _preprocess(model, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> the model's input size and normalisation (tensor ops, no PIL)."""
    try:
        from open_clip.model import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(model)
    except ImportError:  # older open_clip
        cfg = {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = torch.tensor(cfg.get("mean", CLIP_MEAN), device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", CLIP_STD), device=images.device).view(1, 3, 1, 1)
    x = F.interpolate(images.float().clamp(0, 1), size=size, mode="bicubic", align_corners=False, antialias=True)
    return (x.clamp(0, 1) - mean) / std


@torch.no_grad()
def clip_scores(model, tokenizer, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Per-pair CLIP scores ``(B,)`` of ``images`` ``(B, 3, H, W)`` in [0, 1] and ``texts``."""
    if len(texts) != images.shape[0]:
        raise ValueError(f"texts: got {len(texts)} texts for {images.shape[0]} images")
    device = next(model.parameters()).device
    img = F.normalize(model.encode_image(_preprocess(model, images.to(device))).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(list(texts)).to(device)).float(), dim=-1)
    return 100 * (img * txt).sum(-1).clamp(min=0)


def clip_score(model, tokenizer, images: torch.Tensor, texts: Sequence[str]) -> float:
    """Mean CLIP score (functional form of :class:`CLIPScore`)."""
    return float(clip_scores(model, tokenizer, images, texts).mean())


class CLIPScore(Metric):
    """Mean CLIP score of (image, text) pairs with an open_clip model (torchmetrics ``Metric``).

    Args:
        model / tokenizer: from :func:`load_open_clip`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.model, self.tokenizer = model, tokenizer
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, texts: Sequence[str]) -> None:
        s = clip_scores(self.model, self.tokenizer, images, texts)
        self.total += s.double().sum().to(self.total.device)
        self.count += s.numel()

    def compute(self) -> float:
        return float(self.total) / int(self.count) if int(self.count) else float("nan")
