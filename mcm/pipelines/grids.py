"""Sample grids as images: one ``(3, H', W')`` picture of many samples (training, evaluation, CLI)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.utils import make_grid

from mcm.models.adapter_kinds import display_name

#: the smallest side a tile of a labelled grid is shown at (a 32 px base is blown up x4, nearest)
MIN_TILE = 128


def grid_image(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """``(B,3,H,W)`` in [0, 1] -> one ``(3, H', W')`` grid."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=pad, pad_value=1.0)


def upscale_factor(size: int, min_tile: int = MIN_TILE) -> int:
    """The integer nearest-neighbour factor that shows a ``size``-pixel tile at ``>= min_tile`` pixels."""
    return max(1, math.ceil(min_tile / max(1, size)))


def adapter_display_name(adapter) -> str:
    """How grid labels name an adapter ("base + MCM, strength 1.5"): its registered kind's display name."""
    return display_name(adapter)


def comparison_labels(adapter, modalities: list[str], strength) -> list[str]:
    """Row labels of :func:`comparison_grid`: each condition, ``"base alone"``, ``"base + MCM, strength s"``
    (``strength``: a number, ``None`` for the adapter's default, or a label such as ``"map/schedule"``)."""
    s = adapter.default_strength if strength is None else strength
    s = f"{float(s):g}" if isinstance(s, (int, float)) else str(s)
    return list(modalities) + ["base alone", f"base + {adapter_display_name(adapter)}, strength {s}"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def labelled_grid(images: torch.Tensor, nrow: int, row_labels: list[str] | None = None, min_tile: int = MIN_TILE,
                  pad: int = 2):
    """``(B,3,H,W)`` in [0, 1] -> a PIL grid with ``nrow`` tiles per row, each blown up (nearest, an integer
    factor) to at least ``min_tile`` pixels, and ``row_labels[r]`` written left of row ``r``.

    The tiles keep their pixels exactly (``tile[::k, ::k]`` of the grid is the image, quantised as
    ``torchvision.utils.save_image`` does); the label column is on the left, its width is the image's width
    minus the grid's.
    """
    from PIL import Image, ImageDraw

    images = images.detach().float().clamp(0, 1).cpu()
    h, w = images.shape[-2:]
    k = upscale_factor(min(h, w), min_tile)
    if k > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=k, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=pad, pad_value=1.0)
    arr = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    body = Image.fromarray(np.ascontiguousarray(arr))
    if not row_labels:
        return body
    font = _font(max(12, min(24, (h * k) // 8)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), str(t), font=font)[2] for t in row_labels]
    label_w = max(widths) + 16
    out = Image.new("RGB", (label_w + body.width, body.height), (255, 255, 255))
    out.paste(body, (label_w, 0))
    draw = ImageDraw.Draw(out)
    row_h = h * k + pad
    for r, text in enumerate(row_labels):
        top, bottom = draw.textbbox((0, 0), str(text), font=font)[1::2]
        y = pad + r * row_h + (h * k - (bottom - top)) // 2 - top
        draw.text((8, y), str(text), fill=(0, 0, 0), font=font)
    return out


@torch.no_grad()
def comparison_grid(base, adapter, batch: dict, n: int = 8, steps: int = 25, guidance_scale: float = 1.0,
                    seed: int = 0, strength: float | None = None) -> torch.Tensor:
    """Rows: each condition's visualisation, then the base alone, then base + adapter (same seeds) at ``strength``
    (``None``: the adapter's ``default_strength``)."""
    from mcm.diffusion.control import Control, controlled_sample
    from mcm.diffusion.sampling import generators_for

    n = min(n, batch["image"].shape[0])
    conds = {k: batch[k][:n].to(base.device) for k in adapter.modality_names if k in batch}
    prompts = list(batch["caption"][:n]) if base.is_text_conditional and "caption" in batch else None
    labels = batch["class_label"][:n] if base.is_class_conditional and "class_label" in batch else None
    seeds = [seed + i for i in range(n)]
    size = tuple(s // base.downsample for s in batch["image"].shape[-2:])  # the maps' own size, not the base's default
    was_training = adapter.training
    adapter.eval()

    def run(controls):
        x0 = controlled_sample(base, controls, n, size=size, prompts=prompts, class_labels=labels,
                               num_inference_steps=steps, guidance_scale=guidance_scale,
                               generator=generators_for(seeds, None))
        return (base.decode(x0) + 1) / 2

    plain, ctrl = run([]), run([Control(adapter, conds, 1.0, strength)])
    adapter.train(was_training)
    rows = [adapter.plugins[k].visualize(v).cpu() for k, v in conds.items()]
    size = plain.shape[-2:]
    rows = [torch.nn.functional.interpolate(r, size=size, mode="nearest") for r in rows]
    return torch.cat(rows + [plain.cpu(), ctrl.cpu()])
