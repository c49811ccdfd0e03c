"""The embedded ``shapes`` dataset (docs/concepts.md#data-and-shard-keys): generated, deterministic per (seed, split, index).

Each image holds one to four saturated objects (circle, square, triangle, ring, cross) on a
desaturated gradient or noise background.  Objects are painted far to near, so nearer ones
occlude farther ones, and the depth map agrees (0 = nearest, background farthest).
Returns numpy arrays; ``write_shapes_shards`` packs them as webdataset shards in parallel.
"""
from __future__ import annotations

import colorsys
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "circle", "square", "triangle", "ring", "cross")
NUM_CLASSES = len(CLASS_NAMES)
# hue in degrees per colour name used in captions
COLOURS = {"red": 0, "orange": 30, "yellow": 58, "green": 120, "cyan": 182, "blue": 228, "purple": 272, "pink": 320}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass
class ShapesSample:
    image: np.ndarray  # (S, S, 3) uint8
    seg: np.ndarray  # (S, S) uint8 class ids
    depth: np.ndarray  # (S, S) uint16, 0 = nearest
    caption: str
    meta: dict


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, S: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Desaturated (HSV saturation <= 0.15) gradient or smooth noise, (S, S, 3) float in [0, 1]."""
    hue = rng.random()
    sat = rng.uniform(0.0, 0.15)
    if rng.random() < 0.5:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / S  # roughly [-0.7, 0.7]
        v0, v1 = sorted(rng.uniform(0.15, 0.9, size=2))
        val = v0 + (v1 - v0) * (t - t.min()) / max(t.max() - t.min(), 1e-6)
    else:  # smooth value noise: a coarse random grid upsampled bilinearly
        g = rng.integers(3, 6)
        coarse = rng.uniform(0.2, 0.85, size=(g, g)).astype(np.float32)
        val = np.asarray(Image.fromarray(coarse, mode="F").resize((S, S), Image.BILINEAR))
    grey = val[..., None] * np.ones(3, np.float32)
    tint = _hsv_to_rgb(hue, sat, 1.0)  # saturation <= 0.15 keeps the pixel desaturated
    return grey * tint


def _mask(cls: int, S: int, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (S, S) mask of one object of class ``cls``, centre (cx, cy), radius r."""
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated frame
    if cls == 1:  # circle
        return dx * dx + dy * dy <= r * r
    if cls == 2:  # square
        h = r * 0.82
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if cls == 3:  # equilateral triangle, apex up in the rotated frame
        vv = -v
        return (vv >= -r * 0.5) & (np.sqrt(3) * u + vv <= r) & (-np.sqrt(3) * u + vv <= r)
    if cls == 4:  # ring
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if cls == 5:  # cross
        w = max(r * 0.3, 0.9)
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(f"unknown class id {cls}")


def make_sample(seed: int, index: int, size: int = 32, split: str = "train") -> ShapesSample:
    """Generate sample ``index`` of ``split`` for ``seed``; the same arguments give the same arrays."""
    rng = np.random.default_rng([seed, SPLIT_CODE[split], index])
    S = size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    img = _background(rng, S, yy, xx)
    seg = np.zeros((S, S), np.uint8)
    bg_depth = rng.uniform(0.9, 1.0) + rng.uniform(-0.05, 0.0) * (yy / S)  # floor slightly nearer below
    depth = np.clip(bg_depth, 0.85, 1.0).astype(np.float32)

    n = int(rng.integers(1, 5))
    objects: list[dict] = []
    occupied = np.zeros((S, S), bool)
    for _ in range(n):
        cls = int(rng.integers(1, NUM_CLASSES))
        for _try in range(12):  # reject placements that would mostly hide or be hidden
            r = rng.uniform(0.14, 0.3) * S
            cx, cy = rng.uniform(r * 0.7, S - r * 0.7, size=2)
            angle = rng.uniform(0, np.pi / 2) if rng.random() < 0.5 else 0.0
            m = _mask(cls, S, yy, xx, cx, cy, r, angle)
            area = int(m.sum())
            if area >= 6 and (m & occupied).sum() <= 0.25 * area:
                break
        else:
            continue
        occupied |= m
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        hue = (COLOURS[colour] + rng.uniform(-8, 8)) / 360.0
        rgb = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.65, 1.0))
        objects.append(dict(cls=cls, name=CLASS_NAMES[cls], colour=colour, rgb=rgb, mask=m,
                            cx=float(cx), cy=float(cy), r=float(r), angle=float(angle),
                            depth=float(rng.uniform(0.05, 0.8))))

    # paint far -> near so nearer objects occlude farther ones; depth map agrees
    for o in sorted(objects, key=lambda o: -o["depth"]):
        m = o["mask"]
        img[m] = o["rgb"]
        seg[m] = o["cls"]
        # slight tilt so depth is not perfectly flat, still nearer than anything behind it
        depth[m] = np.clip(o["depth"] + 0.02 * (yy[m] - o["cy"]) / S, 0.0, 0.84)

    visible = [o for o in objects if (seg[o["mask"]] == o["cls"]).sum() >= 3]
    visible.sort(key=lambda o: o["cx"])  # caption reads left to right
    words = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['name']}" for o in visible]
    caption = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1] if words else "an empty scene"
    # a class label for class-conditional bases (DiT): the class covering the most pixels, 0 for an empty scene
    counts = np.bincount(seg.ravel(), minlength=NUM_CLASSES)[1:]
    class_label = int(counts.argmax()) + 1 if counts.any() else 0
    meta = {
        "seed": seed, "split": split, "index": index, "size": S, "class_label": class_label,
        "objects": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in o.items() if k not in ("mask", "rgb")}
                    for o in visible],
    }
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    depth16 = np.clip(depth * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
    return ShapesSample(image=image, seg=seg, depth=depth16, caption=caption, meta=meta)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sample_to_wds(sample: ShapesSample, key: str) -> dict:
    """A webdataset sample dict with the shard keys of docs/concepts.md#data-and-shard-keys."""
    return {
        "__key__": key,
        "png": _png(sample.image),
        "seg.png": _png(sample.seg),
        "depth.png": _png(sample.depth),
        "txt": sample.caption,
        "cls": str(sample.meta["class_label"]),
        "json": json.dumps(sample.meta),
    }


def _write_shard(args: tuple[str, str, int, int, int, int, int]) -> int:
    path, split, seed, size, start, stop, shard = args
    import webdataset as wds

    tmp = path + ".tmp"
    # an integer mtime keeps every member a plain ustar header: webdataset's default float time.time()
    # adds a 1 KB pax header per member, which made shards 1.8x larger and tar parsing 2.8x slower
    # (bench/data.py); it also makes shards byte-reproducible per seed
    with wds.TarWriter(tmp, mtime=0) as sink:
        for i in range(start, stop):
            sink.write(sample_to_wds(make_sample(seed, i, size, split), f"{split}_{i:08d}"))
    os.replace(tmp, path)  # atomic: a shard is either complete or absent
    return stop - start


def write_shapes_shards(out: str | Path, train: int, val: int, size: int = 32, seed: int = 0,
                        shard_size: int = 500, workers: int | None = None, test: int = 0) -> dict[str, list[str]]:
    """Write ``out/train-000000.tar ...``, ``out/val-000000.tar ...`` and, with ``test`` > 0,
    ``out/test-000000.tar ...``; returns the shard paths per split.

    Each split draws from its own seed stream (``make_sample(seed, index, size, split)``), so the ``test``
    samples never coincide with ``val`` ones and adding a split changes none of the others: choices are made
    on ``val``, figures reported on ``test``.
    """
    if size < 8:
        raise ValueError(f"--size must be >= 8 pixels, got {size}")
    if train < 0 or val < 0 or test < 0 or train + val + test == 0:
        raise ValueError(f"--train, --val and --test must be >= 0 and not all 0, got train={train} val={val} "
                         f"test={test}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": train, "val": val, "test": test}
    jobs, written = [], {split: [] for split, n in counts.items() if n or split != "test"}
    for split, n in counts.items():
        for shard, start in enumerate(range(0, n, shard_size)):
            path = str(out / f"{split}-{shard:06d}.tar")
            jobs.append((path, split, seed, size, start, min(start + shard_size, n), shard))
            written[split].append(path)
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        total = sum(pool.map(_write_shard, jobs))
    info = {"dataset": "shapes", "size": size, "seed": seed, "classes": list(CLASS_NAMES),
            "counts": {k: v for k, v in counts.items() if k in written},
            "shards": {k: [Path(p).name for p in v] for k, v in written.items()}}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    log.info("wrote %d samples in %d shards to %s", total, len(jobs), out)
    return written
