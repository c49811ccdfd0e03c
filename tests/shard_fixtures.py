"""Tiny hand-made webdataset shards for the data tests: known scenes, corrupt members, truncated tars.

Shards are written member by member with ``tarfile`` (webdataset's on-disk format: one
``<key>.<ext>`` member per field, members of a sample adjacent) so a test controls exactly
what is in them, including what ``webdataset.TarWriter`` would refuse to write.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREY = (128, 128, 128)
SQUARE_ID = 2  # the shapes class id of "square"
NEAR, FAR = 0.1, 0.9  # depth of the square and of the background (0 = nearest)


def png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) / (H, W, 3) or uint16 (H, W) array."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write ``(name, bytes)`` members in order to an uncompressed tar."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, image: np.ndarray, seg: np.ndarray | None = None, depth: np.ndarray | None = None,
                   caption: str | None = None) -> list[tuple[str, bytes]]:
    """The members of one sample: ``key.png`` (+ ``seg.png``, ``depth.png``, ``txt`` when given)."""
    out = [(f"{key}.png", png(image))]
    if seg is not None:
        out.append((f"{key}.seg.png", png(seg)))
    if depth is not None:
        out.append((f"{key}.depth.png", png(depth)))
    out.append((f"{key}.txt", (caption if caption is not None else f"caption of {key}").encode()))
    return out


def plain_sample(key: str, size: int = 16, value: int = 0) -> list[tuple[str, bytes]]:
    """A valid sample with a uniform image, an all-``value`` seg map and a flat depth map."""
    image = np.full((size, size, 3), 60 + 10 * value, np.uint8)
    seg = np.full((size, size), value, np.uint8)
    depth = np.full((size, size), 30000, np.uint16)
    return sample_members(key, image, seg, depth)


def square_scene(size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An asymmetric scene: a saturated red square (seg id 2, near) filling rows 4..27 of the
    LEFT half; the right half is grey background (seg 0, far).  Returns (image, seg, depth16)."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = GREY
    seg = np.zeros((size, size), np.uint8)
    depth = np.full((size, size), int(FAR * 65535), np.uint16)
    rows, cols = slice(size // 8, size - size // 8), slice(0, size // 2)
    image[rows, cols] = RED
    seg[rows, cols] = SQUARE_ID
    depth[rows, cols] = int(NEAR * 65535)
    return image, seg, depth


def truncate(path: Path, keep: int) -> Path:
    """Cut the file to its first ``keep`` bytes (a shard whose copy was interrupted)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (start of data, end of data)`` byte offsets of each member in a tar."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.offset_data + m.size) for m in tf.getmembers()}


def read_shard_members(paths: list[str]) -> dict[str, dict[str, bytes]]:
    """``{sample key: {member suffix: bytes}}`` of every sample in the tar shards ``paths``."""
    out: dict[str, dict[str, bytes]] = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def png_array(data: bytes) -> np.ndarray:
    """A PNG member's pixels as PIL decodes them (ids / 16-bit values kept)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)
