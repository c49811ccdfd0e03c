"""Seeded streams of batches from webdataset shards, split by rank and by worker.

References: webdataset's ``tarfile_to_samples``/``shuffle`` stages (reading any URL it
accepts, ``pipe:`` included) and its guidance for multi-node training: split shards by
node and worker, resample to a fixed epoch length so every rank sees the same number of
batches.  The epoch cut is done by :class:`FixedLengthLoader` in the main process.

* Training streams are endless; :class:`FixedLengthLoader` cuts the same number of batches per
  epoch on every rank, and is *stateful* (Lightning saves its ``state_dict`` in checkpoints), so a
  run resumed mid-epoch continues at the batch after the checkpoint with the same data.  What a
  sample becomes (crop, flip, plugin augmentation) depends only on ``(seed, epoch, key)``, never on
  a process's global random state, and shard order and shuffling only on ``(seed, epoch, rank,
  worker)``: the data of a resumed run are those of the uninterrupted one.
* Evaluation streams (val / test / predict) read every sample of their shards exactly once
  across ranks and workers, in shard order, and end with a last partial batch: no repeats, no
  padding, so metrics are over the exact split.
* Bad data: a decode or validation failure of a sample (:data:`DATA_ERRORS`) is wrapped in
  :class:`~datamodules.sample_decoding.ShardDecodeError` (shard, key, field, what was expected;
  the original as ``__cause__``), logged, counted and skipped.  Any other exception is a bug in
  the code (ours or a plugin's) and stops the run with its traceback.
* Cached shards (``mcm data encode``, :mod:`datamodules.cached_fields`): a sample's ``latent.npy`` /
  text-embedding / prediction members land in the batch as ``latent``, ``text_emb`` and the prediction
  names.  A latent cannot be cropped, so such a sample gets the evaluation presentation (resize + centre
  crop, the one that was encoded); a flip picks ``latent_flip`` (no flip when the shard has none), and
  with predictions (drawn for the unflipped image) there is no flip either.
"""
from __future__ import annotations

import logging
import random
import tarfile
import zlib
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from torchvision import tv_tensors
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator, url_opener

from modalities import Modality

from .cached_fields import (BASE_HASH_KEY, CACHED_KEYS, PREDICTION_KEYS, TEXT_KEY, decode_cached, has_predictions,
                            pad_ragged_text,
                            member, pick_prediction_draw)
from .sample_decoding import (
    CAPTION_KEYS, CLASS_KEY, DATA_ERRORS, IMAGE_EXPECTED, IMAGE_KEYS, BadSampleError, ShardDecodeError,
    SkipCounter, decode_caption, decode_class_label, decode_image, decode_modality, hflip_all, image_field,
    joint_transform, modality_field, unwrap, wrap_for_transform,
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


#: what reading a tar stream raises when the shard itself is truncated or corrupt (bad data, not a bug)
TAR_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, zlib.error)


def reader_share(counts: list[int], rank: int, world: int, worker: int, workers: int) -> int:
    """How many samples reader ``(rank, worker)`` gets from shards holding ``counts`` samples each
    (the same split as :func:`assign_shards`), so evaluation loaders know their exact length."""
    idx = list(range(len(counts)))
    shards, stride, offset = assign_shards(idx, rank, world, worker, workers)  # type: ignore[arg-type]
    n = sum(counts[i] for i in shards)
    return max(0, (n - offset + stride - 1) // stride) if stride > 1 else n


class ShardStream(IterableDataset):
    """Yields collated batches forever (train) or one pass over its shards (eval)."""

    def __init__(self, urls: list[str], plugins: dict[str, Modality], image_size: int, batch_size: int,
                 train: bool, seed: int = 0, shuffle_buffer: int = 1000, hflip: float = 0.5,
                 crop_scale: tuple[float, float] = (0.8, 1.0), rank: int = 0, world_size: int = 1):
        self.urls, self.plugins = list(urls), plugins
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.hflip, self.crop_scale = hflip, tuple(crop_scale)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        wanted = set(IMAGE_KEYS) | set(CAPTION_KEYS) | {"json", CLASS_KEY} | {member(k) for k in CACHED_KEYS}
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
        while True:  # train: repeat, the epoch length is fixed by the loader, not by the data
            order = list(shards)
            if self.train:
                # seeded by the shard list, not by (rank, worker): readers that share shards and split
                # them by sample index (assign_shards' fallback) must see them in the same order; by the
                # shards' names, not their folders, so raw shards and their encoded copies (mcm data encode)
                # are read in the same order
                names = [u.rstrip("/").rsplit("/", 1)[-1] for u in shards]
                random.Random(_seed(self.seed, self.epoch, pass_no, *names)).shuffle(order)
            for url in order:
                yield {"url": url}
            if not self.train:  # eval: every sample once
                return
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
            except TAR_ERRORS as e:
                key = base_plus_ext(last)[0] if last else None
                counter(BadSampleError(f"shard {url}, sample '{key}': shard unreadable after member "
                                       f"{last!r}, dropping the rest ({type(e).__name__}: {e})"))
                if key is not None:  # the marker makes group_by_keys drop the partial sample
                    yield {"fname": f"{key}.__bad__", "data": True, "__url__": url}
            yield {}  # end of shard: samples of different shards never merge

    def _decode_fields(self, sample: dict[str, Any], key: str, url: str
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int | None, dict[str, Any]]:
        """The image, each modality's raw map, the class label (if any) and the cached members (``{}`` for
        a raw sample; of cached predictions, one draw); a data error becomes a :class:`ShardDecodeError`."""
        field, expected = image_field(sample), IMAGE_EXPECTED
        try:
            image = decode_image(sample)
            field, expected = "'cls' / json 'class_label'", "an integer class label"
            label = decode_class_label(sample)
            field, expected = "cached .npy members", "plain .npy arrays written by mcm data encode"
            cached = decode_cached(sample)
            if has_predictions(cached):  # one of the K draws per (seed, epoch, key); draw 0 for validation
                field, expected = "cached prediction members", "the same K draws in each"
                gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, key, "draw")) if self.train else None
                cached = pick_prediction_draw(cached, gen)
            raws = {}
            for n, p in self.plugins.items():
                field, expected = modality_field(p, sample), p.shard_format()
                raws[n] = decode_modality(p, sample, image)
            return image, raws, label, cached
        except DATA_ERRORS as e:
            raise ShardDecodeError.of(url, key, field, expected, str(e)) from e
        except Exception as e:  # a bug (ours or a plugin's), never bad data: it stops the run, traceback kept
            counted = ", ".join(c.__name__ for c in DATA_ERRORS)
            e.add_note(f"while decoding shard {url}, sample '{key}', field {field}; only {counted} count as bad "
                       "data (a plugin reports bad data with modalities.ModalityError)")
            raise

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        image, raws, label, cached = self._decode_fields(sample, key, url)
        # a cached latent cannot be cropped; predictions were drawn for the unflipped image
        preds = has_predictions(cached)
        can_crop = self.train and self.crop_scale != (1.0, 1.0) and "latent" not in cached and not preds
        can_flip = self.train and not preds and ("latent" not in cached or "latent_flip" in cached)
        tf = joint_transform(self.image_size, self.crop_scale if can_crop else None)
        wrapped = [wrap_for_transform(self.plugins[n], r) for n, r in raws.items()]
        if self.train:
            # the crop from torch's CPU generator (torchvision's transforms take no generator), seeded per
            # sample inside fork_rng, so what a sample becomes depends on (seed, epoch, key) only: not on the
            # process, worker or position.  Only that CPU generator is seeded (not torch.manual_seed, which
            # reseeds every CUDA generator too, outside fork_rng(devices=[])'s restore): with num_workers=0 the
            # training step's CPU and CUDA draws are untouched
            sample_seed = _seed(self.seed, self.epoch, key)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed)
                out = tf(tv_tensors.Image(image), *wrapped)
            # the flip from its own draw, the same whether or not the sample is cropped (raw or cached shard)
            flip_draw = torch.rand(1, generator=torch.Generator().manual_seed(_seed(sample_seed, "flip"))).item()
            flip = can_flip and flip_draw < self.hflip
            if flip:
                out = hflip_all(out)
            gen = torch.Generator().manual_seed(_seed(sample_seed, "aug"))
        else:
            out, flip = tf(tv_tensors.Image(image), *wrapped), False
        image_t = out[0].as_subclass(torch.Tensor) if wrapped else out.as_subclass(torch.Tensor)
        item = {"image": image_t.float() / 127.5 - 1.0, "caption": decode_caption(sample), "key": key}
        if label is not None:
            item["class_label"] = label
        if "latent" in cached:
            item["latent"] = cached["latent_flip"] if flip else cached["latent"]  # (C, h, w)
        item.update({k: v for k, v in cached.items() if k in (TEXT_KEY, BASE_HASH_KEY) or k in PREDICTION_KEYS})
        for (n, p), t in zip(self.plugins.items(), out[1:] if wrapped else ()):
            raw = unwrap(p, t)
            raw = p.augment(raw, gen) if self.train else p.eval_transform(raw, key)
            # the map as the step will see it, checked here on the CPU, so the step need not read values back from
            # the device: bad data was already skipped and counted in _decode_fields; what fails here came from
            # the plugin's own derive / augment (a bug, not bad data), and stops the run naming the modality
            p.validate(raw[None])
            item[n] = raw
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches of this reader (rank, worker): a webdataset ``DataPipeline`` of stages, each a plain
        generator function over the previous one's items (:func:`every_nth`, :func:`decoded`, :func:`batched`
        are testable alone); one :class:`SkipCounter` counts the bad samples every stage drops."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards, stride, offset = assign_shards(self.urls, self.rank, self.world_size, worker, workers)
        counter = SkipCounter()
        stages: list[Any] = [
            lambda: self._shard_urls(shards),  # shard URLs (train: endless, seeded order per epoch and pass)
            lambda urls: self._members(urls, counter),  # their selected tar members, a marker per shard end
            lambda members: group_by_keys(members, handler=counter),  # samples
            every_nth(stride, offset),  # few shards for many readers: every n-th sample
        ]
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "shuffle"))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        stages += [decoded(self._decode, counter), batched(self.batch_size, counter, self.train, shards)]
        yield from wds.DataPipeline(*stages)


def every_nth(stride: int, offset: int) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Stage: every ``stride``-th sample from ``offset`` (the sample-level split of :func:`assign_shards`)."""
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        return samples if stride <= 1 else (s for i, s in enumerate(samples) if i % stride == offset)

    return stage


def decoded(decode: Callable[[dict], dict], counter: SkipCounter) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Stage: ``decode`` each sample; bad data (``BadSampleError``) is skipped and counted, anything else
    (a bug) propagates."""
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                item = decode(sample)
            except BadSampleError as e:
                counter(e)
                continue
            yield item

    return stage


def batched(batch_size: int, counter: SkipCounter, train: bool, shards: list[str]
            ) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Stage: items -> collated batches carrying the skip count since the previous batch.  Training yields full
    batches of an endless stream; evaluation also yields the last partial one (no padding) and holds each full
    batch back one step so that skips counted after it are carried by the last batch."""
    def stage(items: Iterator[dict]) -> Iterator[dict]:
        batch: list[dict[str, Any]] = []
        pending: dict[str, Any] | None = None  # eval: the last full batch, held back to carry late skip counts
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                if train:
                    yield collate(batch, counter.take())
                else:
                    if pending is not None:
                        yield pending
                    pending = collate(batch, counter.take())
                batch = []
        if train:
            return
        if batch:  # eval: the last partial batch, no padding
            if pending is not None:
                yield pending
            yield collate(batch, counter.take())
        elif pending is not None:
            pending["skipped"] = pending["skipped"] + counter.take()
            yield pending
        elif counter.count:
            log.warning("%d bad sample(s) and no good one in this reader's share of %s", counter.take(), shards)

    return stage


def collate(items: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Stack tensors, keep strings as lists (torch's ``default_collate``); ``skipped`` = bad samples
    dropped since the last batch."""
    labelled = sum("class_label" in it for it in items)
    if 0 < labelled < len(items):
        unlabelled = [it["key"] for it in items if "class_label" not in it][:5]
        raise ValueError(f"class labels: {labelled} of {len(items)} samples of a batch have one ('cls' or json "
                         f"'class_label') and {unlabelled} do not; expected every sample or none to carry one")
    for k in ("latent", TEXT_KEY, *PREDICTION_KEYS):  # a mix of raw and cached shards (or of encodings)
        n = sum(k in it for it in items)
        if 0 < n < len(items):
            without = [it["key"] for it in items if k not in it][:5]
            raise ValueError(f"cached shards: {n} of {len(items)} samples of a batch have '{member(k)}' and "
                             f"{without} do not; expected shards all encoded the same way (mcm data encode) or "
                             f"all raw")
    # per sample, None where a shard has no base_hash.txt (encoded before it was written): checked by the trainer
    hashes = [it.pop(BASE_HASH_KEY, None) for it in items]
    pad_ragged_text(items)
    out = default_collate(items)
    if any(h is not None for h in hashes):
        out[BASE_HASH_KEY] = hashes
    out["skipped"] = torch.tensor(skipped)
    return out


class FixedLengthLoader:
    """Wraps a DataLoader over a :class:`ShardStream`.

    Training (``finite=False``): the stream is endless and each epoch ends after ``num_batches`` —
    the same number on every rank, so DDP never waits on a rank that ran dry.  The loader is
    stateful: ``state_dict()`` (which Lightning stores in every checkpoint) says how many batches of
    the current epoch the trainer has consumed (``position_fn``, Lightning's prefetching makes the
    loader's own count one ahead); after ``load_state_dict`` the next epoch of the same number
    draws those batches again and drops them, so a resumed run continues with the batch the
    uninterrupted run would have trained on next.

    Evaluation (``finite=True``): one pass over the stream, which ends by itself after every sample;
    ``num_batches`` is the exact count this rank gets when local shards could be counted (an upper
    bound if some samples turn out bad), ``None`` for remote shards (no ``len``).

    Also enforces the bad-sample ceiling: more than ``max_bad_fraction`` of samples skipped
    (after ``min_seen`` samples) stops the run with a clear error.  The stream sits in ``.stream``
    (not ``.dataset``): the length is exact by construction, so Lightning's warning that an
    ``IterableDataset`` with ``__len__`` may be inaccurate across workers does not apply.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, stream: ShardStream, num_batches: int | None,
                 epoch_fn=lambda: 0, max_bad_fraction: float = 0.01, min_seen: int = 200, finite: bool = False,
                 position_fn=None, seed: int = 0):
        self.loader, self.stream, self.num_batches = loader, stream, num_batches
        self.epoch_fn, self.max_bad_fraction, self.min_seen = epoch_fn, max_bad_fraction, min_seen
        self.finite, self.position_fn, self.seed = finite, position_fn, seed
        self.seen = 0
        self.skipped = 0
        self._epoch = 0
        self._counts: list[tuple[int, int]] = []  # (seen, skipped) after each batch yielded this epoch
        self._counts_before = (0, 0)  # (seen, skipped) when this epoch began
        self._resume: dict[str, int] | None = None
        self._skip = 0  # batches of this epoch drawn again and dropped (a resumed epoch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the number of batches of remote evaluation shards is not known in advance")
        return self.num_batches

    # ---- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Epoch and batches of it consumed by the trainer; the bad-sample counters at that point."""
        yielded = len(self._counts)
        consumed = yielded if self.position_fn is None else max(0, min(int(self.position_fn()), yielded))
        seen, skipped = self._counts[consumed - 1] if consumed else self._counts_before
        return {"epoch": self._epoch, "batches": consumed, "seen": seen, "skipped": skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {k: int(v) for k, v in state.items()}
        self.seen, self.skipped = self._resume.get("seen", 0), self._resume.get("skipped", 0)

    # ---- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader) if self.finite else None
        try:
            if self.finite:
                self._counts = []
                yield from self._checked(it)
                return
            it = self._start_epoch()
            yield from self._epoch_batches(it)
        finally:  # workers stop now (an endless stream's keep prefetching), not when the iterator is collected
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _start_epoch(self):
        epoch = int(self.epoch_fn())
        skip = 0
        if self._resume is not None:
            if self._resume.get("epoch") == epoch and self._resume.get("batches", 0) < self.num_batches:
                skip = self._resume["batches"]
            self._resume = None
        self._epoch, self._counts, self._counts_before = epoch, [], (self.seen, self.skipped)
        self.stream.set_epoch(epoch)  # workers are re-created per epoch and pick it up
        if self.loader.generator is not None:  # workers' base seed: a function of the epoch, not of global RNG
            self.loader.generator.manual_seed(_seed(self.seed, epoch, "loader"))
        self._skip = skip
        return iter(self.loader)

    def _epoch_batches(self, it) -> Iterator[dict[str, Any]]:
        skip, epoch = self._skip, self._epoch
        batches = self._take(it, self.num_batches)
        for _ in range(skip):  # consumed before the checkpoint: drawn again (same data), not used again
            next(batches)
            self._counts.append((self.seen, self.skipped))
        if skip:
            log.info("resuming epoch %d at batch %d of %d", epoch, skip, self.num_batches)
        yield from self._checked(batches)

    def _take(self, it: Iterator[dict[str, Any]], n: int) -> Iterator[dict[str, Any]]:
        for i in range(n):
            try:
                yield next(it)
            except StopIteration:
                raise RuntimeError(f"the training stream ended after {i} of {n} batches of the epoch; every sample "
                                   "of some reader's shards was bad (see the warnings above)") from None

    def _checked(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            self.seen += len(batch["key"])
            self.skipped += int(batch["skipped"])
            self._counts.append((self.seen, self.skipped))
            total = self.seen + self.skipped
            if total >= self.min_seen and self.skipped > self.max_bad_fraction * total:
                raise RuntimeError(
                    f"{self.skipped} of {total} samples were bad ({self.skipped / total:.1%}), above the "
                    f"ceiling max_bad_fraction={self.max_bad_fraction:.1%}; see the warnings above for which "
                    f"shards and keys, or raise data.max_bad_fraction")
            yield batch
