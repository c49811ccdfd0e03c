"""How well each sketch region hint (:mod:`modalities.sketch_regions`) covers the true foreground: the figures
in that module's docstring, on held-out ``shapes`` maps (the sketch derived from the image as in training).

    python -m mcm.evaluation.hint_accuracy            # 200 maps of the val split, seed 0
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from datamodules.shapes import make_sample
from modalities.masks import mask_iou
from modalities.sketch import detect_edges
from modalities.sketch_regions import crossing_parity, enclosed, enclosed_open_border


def hint_accuracy(n: int = 200, split: str = "val") -> dict[str, float]:
    """Mean foreground IoU of each hint (thresholded at 1/2) over ``n`` held-out maps."""
    samples = [make_sample(0, i, 32, split) for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).float().permute(0, 3, 1, 2) / 255
    edges = detect_edges(images)
    fg = torch.from_numpy(np.stack([s.seg != 0 for s in samples]))
    hints = {"enclosed": enclosed(edges) > 0.5, "crossing_parity >= 0.5": crossing_parity(edges) >= 0.5,
             "enclosed_open_border >= 0.5": enclosed_open_border(edges) >= 0.5}
    return {name: mask_iou(hint[:, 0], fg).mean().item() for name, hint in hints.items()}


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - prints the figures
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    a = p.parse_args(argv)
    for name, iou in hint_accuracy(a.n).items():
        print(f"{name}: mean foreground IoU {iou:.3f} over {a.n} held-out shapes32 maps")


if __name__ == "__main__":  # pragma: no cover
    main()
