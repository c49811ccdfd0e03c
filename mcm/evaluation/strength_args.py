"""Command-line forms of regional and scheduled control, shared by ``mcm sample``, ``mcm demo`` and
``mcm evaluate``: ``--strength-map PNG``, ``--strength-schedule S1,S2,...``, ``--window LOW HIGH``.

They turn into what ``MCMPipeline`` takes (docs/concepts.md#the-mcm): a map, a per-step list or ``(map, schedule)``,
each times the float ``--strength`` (or 1 when it is left to the modules' defaults).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def read_mask(path: str, flag: str) -> torch.Tensor:
    """A greyscale (or RGB, averaged) PNG -> ``(H, W)`` float in [0, 1], white = 1."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: '{path}' does not exist")
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im, dtype=np.float32)
    arr = arr.mean(-1) if arr.ndim == 3 else arr
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return torch.from_numpy(arr / top)


def parse_schedule(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--strength-schedule {text!r}: expected comma-separated numbers, one per step "
                         f"(e.g. 1,1,0.5,0)") from None


def combine(scale: float | None, smap: torch.Tensor | None, schedule: list[float] | None):
    """``--strength`` with a map and/or a schedule -> the pipeline's ``strength`` argument."""
    if smap is None and schedule is None:
        return scale
    s = 1.0 if scale is None else scale
    if smap is not None and schedule is not None:
        return (smap * s, schedule)
    return smap * s if smap is not None else [v * s for v in schedule]


def strength_from_args(a: argparse.Namespace, scale: float | None = None):
    """The pipeline's ``strength`` for this command line (``scale`` overrides ``a.strength``)."""
    smap = read_mask(a.strength_map, "--strength-map") if getattr(a, "strength_map", None) else None
    return combine(a.strength if scale is None else scale, smap, parse_schedule(getattr(a, "strength_schedule", None)))


def add_strength_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strength-map", default=None, metavar="PNG",
                   help="greyscale strength map at the output size (white = --strength, black = 0)")
    p.add_argument("--strength-schedule", default=None, metavar="S1,S2,...",
                   help="strength per step, noisiest first (times --strength)")
    p.add_argument("--window", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                   help="noise fractions t/T where the modules act (1 = pure noise; default 0 1)")
