"""An endless, seeded stream of batches from webdataset shards, split by rank and by worker.

References: webdataset's ``tarfile_to_samples``/``shuffle`` stages (reading any URL it
accepts, ``pipe:`` included) and its guidance for multi-node training: split shards by
node and worker, resample to a fixed epoch length so every rank sees the same number of
batches.  The epoch cut is done by :class:`FixedLengthLoader` in the main process.
"""
from __future__ import annotations

import logging
import random
import zlib
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from torchvision import tv_tensors
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator, url_opener

from modalities import Modality

from .sample_decoding import (
    IMAGE_KEYS, CAPTION_KEYS, BadSampleError, SkipCounter, decode_caption, decode_image, decode_modality,
    joint_transform, unwrap, wrap_for_transform,
)

log = logging.getLogger(__name__)


def assign_shards(urls: list[str], rank: int, world: int, worker: int, workers: int) -> tuple[list[str], int, int]:
    """Which shards this (rank, worker) reads, and which of their samples it keeps.

    Returns ``(shards, stride, offset)``: keep sample ``i`` of the stream when
    ``i % stride == offset``.  With enough shards every reader gets whole, disjoint shards;
    with fewer, the split falls back to samples so no reader is ever left empty.
    """
    readers = world * workers
    if len(urls) >= readers:
        return urls[rank * workers + worker::readers], 1, 0
    if len(urls) >= world:
        return urls[rank::world], workers, worker
    return list(urls), readers, rank * workers + worker


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


class ShardStream(IterableDataset):
    """Yields collated batches forever (train) or in a fixed order (eval), never ending by itself."""

    def __init__(self, urls: list[str], plugins: dict[str, Modality], image_size: int, batch_size: int,
                 train: bool, seed: int = 0, shuffle_buffer: int = 1000, hflip: float = 0.5,
                 crop_scale: tuple[float, float] = (0.8, 1.0), rank: int = 0, world_size: int = 1):
        self.urls, self.plugins = list(urls), plugins
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.hflip, self.crop_scale = hflip, tuple(crop_scale)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        wanted = set(IMAGE_KEYS) | set(CAPTION_KEYS) | {"json"}
        for p in plugins.values():
            wanted |= set(p.shard_keys) | set(p.derive_keys)
        self.wanted_suffixes = tuple(sorted(wanted))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _select(self, name: str) -> bool:
        # decode only what the configured modalities need: skip other members unread
        return any(name.endswith("." + k) for k in self.wanted_suffixes)

    def _shard_urls(self, shards: list[str]) -> Iterator[dict[str, str]]:
        pass_no = 0
        while True:  # repeat: the epoch length is fixed by the loader, not by the data
            order = list(shards)
            if self.train:
                # seeded by the shard list, not by (rank, worker): readers that share shards and split
                # them by sample index (assign_shards' fallback) must see them in the same order
                random.Random(_seed(self.seed, self.epoch, pass_no, *shards)).shuffle(order)
            for url in order:
                yield {"url": url}
            pass_no += 1

    def _members(self, sources: Iterator[dict[str, str]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """The selected tar members of each shard, then an end-of-shard marker (webdataset's
        ``tar_file_expander``, except that a shard failing mid-way (truncated, unreadable) counts
        once, as the sample being read, which is dropped because it may be incomplete)."""
        for source in url_opener(sources, handler=counter):
            url, last = source["url"], None
            try:
                for member in tar_file_iterator(source["stream"], select_files=self._select):
                    last = member["fname"]
                    yield {**member, "__url__": url}
            except Exception as e:
                key = base_plus_ext(last)[0] if last else None
                counter(BadSampleError(f"shard {url}, sample '{key}': shard unreadable after member "
                                       f"{last!r}, dropping the rest ({type(e).__name__}: {e})"))
                if key is not None:  # the marker makes group_by_keys drop the partial sample
                    yield {"fname": f"{key}.__bad__", "data": True, "__url__": url}
            yield {}  # end of shard: samples of different shards never merge

    def _decode(self, sample: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            image = decode_image(sample)
            raws = {n: decode_modality(p, sample, image) for n, p in self.plugins.items()}
            tf = joint_transform(self.image_size, self.train, self.hflip, self.crop_scale)
            wrapped = [wrap_for_transform(self.plugins[n], r) for n, r in raws.items()]
            out = tf(tv_tensors.Image(image), *wrapped)
            image_t = out[0].as_subclass(torch.Tensor) if wrapped else out.as_subclass(torch.Tensor)
            item = {"image": image_t.float() / 127.5 - 1.0, "caption": decode_caption(sample), "key": key}
            for (n, p), t in zip(self.plugins.items(), out[1:] if wrapped else ()):
                raw = unwrap(p, t)
                raw = p.augment(raw, gen) if self.train else p.eval_transform(raw, key)
                item[n] = raw
            return item
        except Exception as e:
            raise type(e)(f"shard {url}, sample '{key}': {e}") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards, stride, offset = assign_shards(self.urls, self.rank, self.world_size, worker, workers)
        counter = SkipCounter()
        gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, worker, "aug"))
        samples: Iterator[dict] = group_by_keys(self._members(self._shard_urls(shards), counter), handler=counter)
        if stride > 1:
            samples = (s for i, s in enumerate(samples) if i % stride == offset)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "shuffle"))
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        batch: list[dict[str, Any]] = []
        for sample in samples:
            try:
                batch.append(self._decode(sample, gen))
            except Exception as e:
                counter(e)
                continue
            if len(batch) == self.batch_size:
                yield collate(batch, counter.take())
                batch = []


def collate(items: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Stack tensors, keep strings as lists (torch's ``default_collate``); ``skipped`` = bad samples
    dropped since the last batch."""
    out = default_collate(items)
    out["skipped"] = torch.tensor(skipped)
    return out


class FixedLengthLoader:
    """Wraps a DataLoader over an endless :class:`ShardStream` and ends each epoch after
    ``num_batches`` — the same number on every rank, so DDP never waits on a rank that ran dry.

    Also enforces the bad-sample ceiling: more than ``max_bad_fraction`` of samples skipped
    (after ``min_seen`` samples) stops the run with a clear error.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: ShardStream, num_batches: int,
                 epoch_fn=lambda: 0, max_bad_fraction: float = 0.01, min_seen: int = 200):
        self.loader, self.dataset, self.num_batches = loader, dataset, num_batches
        self.epoch_fn, self.max_bad_fraction, self.min_seen = epoch_fn, max_bad_fraction, min_seen
        self.seen = 0
        self.skipped = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch_fn())  # workers are re-created per epoch and pick it up
        it = iter(self.loader)
        for _ in range(self.num_batches):
            batch = next(it)
            self.seen += len(batch["key"])
            self.skipped += int(batch["skipped"])
            total = self.seen + self.skipped
            if total >= self.min_seen and self.skipped > self.max_bad_fraction * total:
                raise RuntimeError(
                    f"{self.skipped} of {total} samples were bad ({self.skipped / total:.1%}), above the "
                    f"ceiling max_bad_fraction={self.max_bad_fraction:.1%}; see the warnings above for which "
                    f"shards and keys, or raise data.max_bad_fraction")
            yield batch
