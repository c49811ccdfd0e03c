"""``mcm data inspect SHARDS``: what is in a set of webdataset shards, and what is broken.

``inspect_shards`` reads tars with the ``tarfile`` module (streaming, so a truncated shard is
read up to the break and reported, not fatal), groups members into samples the way webdataset
does (member name up to the first dot of its base name), and decodes only with PIL, ``json``
and UTF-8; unknown keys are counted, never decoded, and nothing is unpickled.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXAMPLES = 5
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class _Group:
    """One sample: its key, member bytes by extension, and whether the tar broke inside it."""

    key: str
    members: dict[str, bytes]
    complete: bool = True


def _split_name(name: str) -> tuple[str, str] | None:
    """``dir/a.seg.png`` -> (``dir/a``, ``seg.png``); webdataset's rule.  None without an extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not ext:
        return None
    return (f"{head}/{stem}" if head else stem), ext


def _groups(path: str, problems: list[str]) -> Iterator[_Group]:
    """Samples of one tar in order; a read error ends the shard with a problem, not an exception."""
    key, members, n = None, {}, 0
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                parts = _split_name(m.name) if m.isfile() else None
                if parts is None:
                    continue
                data = tf.extractfile(m).read()
                n += 1
                if parts[0] != key and members:
                    yield _Group(key, members)
                    members = {}
                key = parts[0]
                members[parts[1]] = data
            # tarfile ends quietly at a cut header or member boundary; a whole tar ends with zero blocks
            if tf.fileobj.read(512) != bytes(512):
                raise tarfile.ReadError("no end-of-archive marker: the file ends inside or between members")
    except _TAR_ERRORS as e:
        problems.append(f"{path}: truncated or corrupt tar after {n} readable members ({type(e).__name__}: {e})")
        if members:
            yield _Group(key, members, complete=False)
        return
    if members:
        yield _Group(key, members)


def _pixels(data: bytes) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decode an image fully with PIL -> (array, mode, (W, H)); 16-bit stays 16-bit."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im, dtype=np.int64), im.mode, im.size
        return np.asarray(im), im.mode, im.size


@dataclass
class _Stats:
    """Running totals over samples; ``summary()`` is the dict ``inspect_shards`` returns."""

    shards: dict[str, int] = field(default_factory=dict)
    keys: Counter = field(default_factory=Counter)
    image_sizes: Counter = field(default_factory=Counter)
    seg_pixels: Counter = field(default_factory=Counter)
    seg_samples: Counter = field(default_factory=Counter)
    depth_min: int | None = None
    depth_max: int | None = None
    captions: list[str] = field(default_factory=list)
    unreadable_samples: int = 0
    unreadable_members: int = 0
    unreadable_shards: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, shard: str, g: _Group) -> None:
        """Count one sample; each key that fails to decode is a problem naming shard, key and member."""
        self.shards[shard] += 1
        self.keys.update(g.members.keys())
        bad = [] if g.complete else ["the tar ends inside this sample"]
        if not any(k in g.members for k in IMAGE_KEYS):
            bad.append(f"no image key (one of {IMAGE_KEYS})")
        for ext, data in g.members.items():
            try:
                self._decode(ext, data)
            except Exception as e:  # PIL, json and UTF-8 errors alike: count, name, go on
                self.unreadable_members += 1
                bad.append(f"'{ext}' unreadable ({type(e).__name__}: {e})")
        if bad:
            self.unreadable_samples += 1
            self.problems.append(f"{shard}: sample {g.key!r}: " + "; ".join(bad))

    def _decode(self, ext: str, data: bytes) -> None:
        if ext in IMAGE_KEYS:
            self.image_sizes[_pixels(data)[2]] += 1
        elif ext == "seg.png":
            ids, mode, _ = _pixels(data)
            if mode not in ("L", "P"):
                raise ValueError(f"expected 8-bit label ids (mode L or P), got mode {mode}")
            counts = np.bincount(ids.ravel(), minlength=1)
            present = np.flatnonzero(counts)
            self.seg_pixels.update({int(c): int(counts[c]) for c in present})
            self.seg_samples.update(int(c) for c in present)
        elif ext == "depth.png":
            d, _, _ = _pixels(data)
            lo, hi = int(d.min()), int(d.max())
            self.depth_min = lo if self.depth_min is None else min(self.depth_min, lo)
            self.depth_max = hi if self.depth_max is None else max(self.depth_max, hi)
        elif ext == "sketch.png":
            _pixels(data)
        elif ext in ("txt", "caption"):
            text = data.decode("utf-8").strip()
            if len(self.captions) < CAPTION_EXAMPLES:
                self.captions.append(text)
        elif ext == "json":
            json.loads(data.decode("utf-8"))

    def summary(self, stopped_early: bool) -> dict[str, Any]:
        return {
            "samples": sum(self.shards.values()),
            "shards": dict(self.shards),
            "keys": dict(sorted(self.keys.items())),
            "image_sizes": dict(self.image_sizes.most_common()),  # (W, H) -> samples
            "seg_pixels": dict(sorted(self.seg_pixels.items())),  # class id -> pixels
            "seg_samples": dict(sorted(self.seg_samples.items())),  # class id -> samples containing it
            "depth_range": None if self.depth_min is None else (self.depth_min, self.depth_max),
            "captions": list(self.captions),
            "unreadable_samples": self.unreadable_samples,
            "unreadable_members": self.unreadable_members,
            "unreadable_shards": list(self.unreadable_shards),
            "problems": list(self.problems),
            "stopped_early": stopped_early,
        }


def inspect_shards(spec: str | list[str], max_samples: int | None = None) -> dict[str, Any]:
    """Summarise local shards (path, glob or brace pattern) into a dict.

    Keys: ``samples``, ``shards`` (path -> samples), ``keys`` (key -> samples having it),
    ``image_sizes`` ((W, H) -> samples), ``seg_pixels`` / ``seg_samples`` (class id -> pixels /
    samples containing it), ``depth_range`` ((min, max) raw uint16 or None), ``captions``
    (first few), ``unreadable_samples``, ``unreadable_members``, ``unreadable_shards`` (tars
    that broke), ``problems`` (one message per broken shard or sample), ``stopped_early``.
    """
    from .shard_datamodule import expand_shards

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    urls = expand_shards(spec, "mcm data inspect")
    remote = [u for u in urls if ":" in u.split("/", 1)[0] and not u.startswith("file:")]
    if remote:
        raise ValueError(f"mcm data inspect reads local files only; got {remote[:3]}")
    stats, seen = _Stats(), 0
    for url in urls:
        path = url.removeprefix("file:")
        stats.shards[path] = 0
        before = len(stats.problems)
        for group in _groups(path, stats.problems):
            if max_samples is not None and seen >= max_samples:
                return stats.summary(stopped_early=True)
            stats.add(path, group)
            seen += 1
        if any(p.startswith(f"{path}: truncated") for p in stats.problems[before:]):
            stats.unreadable_shards.append(path)
            stats.unreadable_members += 1  # the member the tar broke in
    return stats.summary(stopped_early=False)


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """Render an ``inspect_shards`` summary as rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    n = summary["samples"]

    def table(title: str, *cols: str) -> Table:
        t = Table(title=title, title_justify="left")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        return t

    early = " (stopped early)" if summary["stopped_early"] else ""
    t = table(f"{n} samples in {len(summary['shards'])} shards{early}", "shard", "samples")
    for path, k in summary["shards"].items():
        t.add_row(escape(path), str(k))
    console.print(t)
    t = table("keys", "key", "samples", "% of samples")
    for k, c in summary["keys"].items():
        t.add_row(k, str(c), f"{100 * c / max(n, 1):.1f}")
    console.print(t)
    t = table("image sizes", "W x H", "samples")
    for (w, h), c in summary["image_sizes"].items():
        t.add_row(f"{w} x {h}", str(c))
    console.print(t)
    if summary["seg_pixels"]:
        total = sum(summary["seg_pixels"].values())
        t = table("segmentation classes (seg.png)", "class id", "pixels", "% of pixels", "samples")
        for c, px in summary["seg_pixels"].items():
            t.add_row(str(c), str(px), f"{100 * px / total:.2f}", str(summary["seg_samples"][c]))
        console.print(t)
    if summary["depth_range"] is not None:
        lo, hi = summary["depth_range"]
        console.print(f"depth.png range: {lo} .. {hi} (of 0 .. 65535, 0 = nearest)")
    for cap in summary["captions"]:
        console.print(Text(f"caption: {cap!r}"))
    console.print(f"unreadable: {summary['unreadable_samples']} samples, {summary['unreadable_members']} members, "
                  f"{len(summary['unreadable_shards'])} shards")
    for p in summary["problems"][:20]:
        console.print(Text(f"  {p}", style="red"))
    if len(summary["problems"]) > 20:
        console.print(f"  ... and {len(summary['problems']) - 20} more")


def run_inspect(spec: str | list[str], max_samples: int | None) -> int:
    """CLI body: 0 when every sample read cleanly, 1 when anything was unreadable or empty, 2 on bad args."""
    try:
        summary = inspect_shards(spec, max_samples)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    print_summary(summary)
    clean = summary["samples"] > 0 and not summary["problems"]
    return 0 if clean else 1


def add_inspect_command(data: argparse._SubParsersAction) -> None:
    """Attach ``mcm data inspect`` (called from ``datamodules.pack.add_command``)."""
    i = data.add_parser("inspect", help="summarise shards: counts, keys, sizes, labels, depth, captions; "
                                        "exit code 1 if anything is unreadable")
    i.add_argument("shards", nargs="+", help="shard paths, globs or brace patterns, e.g. "
                   "'out/train-{000000..000009}.tar' 'out/val-*.tar' (summarised together)")
    i.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    i.set_defaults(func=lambda a: run_inspect(a.shards, a.max_samples))
