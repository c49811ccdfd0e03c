"""``ShardDataModule``: webdataset shards -> batches for MCM, ControlNet and base pretraining.

Batches are ``{"image": (B,3,H,W) in [-1,1], "<modality>": raw map, "caption": list[str],
"key": list[str], "skipped": int tensor}`` (see ``modalities.base`` for raw map formats).

Cached shards (``mcm data encode``) read with the same config add ``"latent"`` ``(B, C, h, w)``,
``"text_emb"`` (a tensor, or the SDXL / SD3 dict) and the prediction arrays ``(B, K, ...)``; the
training step then skips the VAE and text encoder (or the base).  ``cached_base`` is the base they
were encoded for (``base.json``), which the LightningModule checks against its own.
"""
from __future__ import annotations

import glob
import logging
import os
import tarfile
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

import modalities as modality_registry

from .cached_fields import read_base_json
from .shard_stream import FixedLengthLoader, ShardStream, reader_share

log = logging.getLogger(__name__)

_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


def expand_shards(spec: str | list[str] | None, what: str) -> list[str]:
    """Brace patterns / lists -> URLs; local paths must exist (a clear error names the missing ones).

    Each string is expanded as webdataset expands a URL (``::`` joins, ``${VAR}`` from ``WDS_VAR``, braces).
    """
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str) else list(spec)
    try:
        urls = [u for s in specs for u in expand_urls(s)]
    except AssertionError as e:  # webdataset asserts that ${VAR} has a WDS_VAR in the environment
        raise ValueError(f"{what}: cannot expand the shard list {spec!r}: {e}") from None
    # local globs (data/shapes/train-*.tar) expand too; a glob matching nothing stays and is reported missing
    # (expand_urls does braces only; it never globs)
    urls = [m for u in urls for m in (sorted(glob.glob(u)) or [u] if "*" in u and not u.startswith(_REMOTE) else [u])]
    if not urls:
        raise ValueError(f"{what}: the shard list {spec!r} is empty; expected a path, brace pattern or URL")
    missing = [u for u in urls if not u.startswith(_REMOTE) and not os.path.exists(u.removeprefix("file:"))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(urls)} shards do not exist: {missing[:5]}{more}")
    return urls


def is_remote(url: str) -> bool:
    """A shard read through a URL or a ``pipe:`` command, not a local file."""
    return url.startswith(_REMOTE)


def shard_folders(urls: list[str]) -> list[str]:
    """The local folders the shards of ``urls`` lie in (where ``mcm data encode`` writes ``base.json``)."""
    return sorted({os.path.dirname(os.path.abspath(u.removeprefix("file:"))) for u in urls if not is_remote(u)})


def count_samples(urls: list[str], what: str) -> int:
    """Distinct sample keys in local tar shards (reads headers only)."""
    if any(u.startswith(_REMOTE) for u in urls):
        raise ValueError(f"{what}: cannot count samples of remote shards; set the number of samples per epoch explicitly")
    n = 0
    for u in urls:
        keys: set[str] = set()
        try:
            with tarfile.open(u.removeprefix("file:")) as tf:
                for m in tf:  # member by member: getmembers() would raise before anything is counted
                    if m.isfile():
                        keys.add(m.name.split(".", 1)[0])
        except (tarfile.TarError, OSError) as e:  # a truncated shard still counts what it has
            log.warning("%s: could not fully read %s to count samples: %s", what, u, e)
        n += len(keys)
    return n


class ShardDataModule(L.LightningDataModule):
    """Streams webdataset shards with joint geometric augmentation and per-modality augmentation.

    Args:
        train_shards: path, glob (``data/shapes/train-*.tar``), brace pattern
            (``data/shapes/train-{000000..000003}.tar``) or any
            webdataset URL (``pipe:aws s3 cp s3://b/s-{0..9}.tar -``); ``::`` joins several.
        val_shards: same, for validation (also used for test/predict when ``test_shards`` is unset).
        test_shards: same, for test and predict.
        modalities: plugins and their options, e.g. ``{"segmentation": {"num_classes": 6}}``.
        image_size: output side in pixels (square).
        batch_size: per-rank batch size.
        num_workers: data-loading processes per rank (0 = in the main process).
        train_samples: samples per training epoch (all ranks together); ``None`` counts local shards.
        val_samples: unused (kept so older configs parse): validation reads every sample of ``val_shards``
            exactly once across ranks and workers.
        limit_train_samples: read only the first N training samples (the limited-data regime of the
            paper); the rest of the shards are ignored. ``None`` uses everything.
        shuffle_buffer: webdataset shuffle buffer (samples).
        hflip: probability of a horizontal flip (training).
        crop_scale: area range of the random resized crop (training); ``[1, 1]`` disables cropping (resize the
            shorter side, centre crop, as evaluation does).  Cached shards: a latent cannot be cropped, so
            cropping is off for them (one warning says so); ``hflip`` picks the cached ``latent_flip``.  With
            cached predictions (``--predictions K``) neither crop nor flip applies: they were drawn for the
            unflipped, uncropped image.
        seed: seeds shard order, shuffling and augmentation together with (epoch, rank, worker).
        max_bad_fraction: stop with an error when more than this share of samples is bad.
    """

    def __init__(self, train_shards: str | None = None, val_shards: str | None = None,
                 test_shards: str | None = None, modalities: dict[str, dict[str, Any]] | None = None,
                 image_size: int = 32, batch_size: int = 32, num_workers: int = 2,
                 train_samples: int | None = None, val_samples: int | None = None,
                 limit_train_samples: int | None = None, shuffle_buffer: int = 1000, hflip: float = 0.5,
                 crop_scale: tuple[float, float] = (0.8, 1.0), seed: int = 0, max_bad_fraction: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.modality_spec = dict(modalities or {})
        self.plugins = modality_registry.build_all(self.modality_spec)
        self.loaders: dict[str, FixedLengthLoader] = {}
        self._cached: dict[str, dict | None] = {}  # shard list -> its base.json record
        self._warned_cached = False

    # ---- helpers -------------------------------------------------------------------------
    def _dist(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _position(self) -> int:
        """Batches of the current training epoch the trainer has consumed (what a checkpoint resumes after)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _make(self, spec: str | None, train: bool, n_samples: int | None, what: str) -> FixedLengthLoader:
        return self._make_train(spec, n_samples, what) if train else self._make_eval(spec, what)

    def _stream(self, urls: list[str], train: bool) -> ShardStream:
        h = self.hparams
        rank, world = self._dist()
        return ShardStream(urls, self.plugins, h.image_size, h.batch_size, train=train, seed=h.seed,
                           shuffle_buffer=h.shuffle_buffer if train else 0, hflip=h.hflip, crop_scale=h.crop_scale,
                           rank=rank, world_size=world)

    def _loader(self, stream: ShardStream) -> DataLoader:
        h = self.hparams
        # an own generator: creating the iterator (the workers' base seed) never draws from torch's global RNG
        return DataLoader(stream, batch_size=None, num_workers=h.num_workers, persistent_workers=False,
                          prefetch_factor=4 if h.num_workers else None, generator=torch.Generator())

    def _make_train(self, spec: str | None, n_samples: int | None, what: str) -> FixedLengthLoader:
        h = self.hparams
        urls = expand_shards(spec, what)
        self._check_cached(urls, what, train=True)
        if h.limit_train_samples:
            urls, n_samples = self._limited(urls, h.limit_train_samples)
        n = n_samples if n_samples is not None else count_samples(urls, what)
        rank, world = self._dist()
        per_step = h.batch_size * world
        if n < per_step:
            raise ValueError(f"{what}: {n} samples cannot fill one batch of {h.batch_size} on each of {world} ranks")
        num_batches = n // per_step
        stream = self._stream(urls, True)
        position = self._position if self.trainer is not None and hasattr(self.trainer, "fit_loop") else None
        loader = FixedLengthLoader(self._loader(stream), stream, num_batches, self._epoch, h.max_bad_fraction,
                                   position_fn=position, seed=h.seed)
        self.loaders[what] = loader
        log.info("%s: %d shards, %d samples, %d batches per rank per epoch", what, len(urls), n, num_batches)
        return loader

    def _make_eval(self, spec: str | None, what: str) -> FixedLengthLoader:
        """One pass over every sample of the shards, split across ranks and workers (each sample read once)."""
        h = self.hparams
        urls = expand_shards(spec, what)
        self._check_cached(urls, what, train=False)
        rank, world = self._dist()
        num_batches = None
        if not any(u.startswith(_REMOTE) for u in urls):
            counts = [count_samples([u], what) for u in urls]
            workers = max(1, h.num_workers)
            shares = [reader_share(counts, rank, world, w, workers) for w in range(workers)]
            num_batches = sum(-(-n // h.batch_size) for n in shares)
            log.info("%s: %d shards, %d samples; rank %d reads %d of them in %d batches", what, len(urls),
                     sum(counts), rank, sum(shares), num_batches)
        stream = self._stream(urls, False)
        loader = FixedLengthLoader(self._loader(stream), stream, num_batches, max_bad_fraction=h.max_bad_fraction,
                                   finite=True, seed=h.seed)
        self.loaders[what] = loader
        return loader

    @staticmethod
    def _limited(urls: list[str], limit: int) -> tuple[list[str], int]:
        """Keep whole leading shards up to ``limit`` samples (deterministic subset for limited-data runs)."""
        kept, total = [], 0
        for u in urls:
            if total >= limit:
                break
            kept.append(u)
            total += count_samples([u], "limit_train_samples")
        if total > limit:
            log.info("limit_train_samples=%d: using %d shards holding %d samples", limit, len(kept), total)
        return kept, min(total, limit)

    # ---- cached shards (mcm data encode) ----------------------------------------------------
    def _cached_record(self, urls: list[str], what: str) -> dict | None:
        """The ``base.json`` of the shards' folders (``None``: raw shards), the same for every folder."""
        key = "\n".join(urls)
        if key not in self._cached:
            records = {d: read_base_json(d) for d in shard_folders(urls)}
            found = {d: r for d, r in records.items() if r is not None}
            if found and len(found) < len(records):
                raw = sorted(d for d, r in records.items() if r is None)
                raise ValueError(f"{what}: {sorted(found)} hold cached shards (base.json) but {raw} do not; expected "
                                 f"all raw or all encoded (mcm data encode --base ... --out DIR)")
            hashes = {r["hash"] for r in found.values()}
            if len(hashes) > 1:
                bases = "; ".join(f"{d}: '{r.get('source')}' ({r['hash'][:12]}...)" for d, r in found.items())
                raise ValueError(f"{what}: the shard folders were encoded for different bases: {bases}")
            d, rec = next(iter(found.items()), (None, None))
            self._cached[key] = None if rec is None else {**rec, "shard_dir": d}
        return self._cached[key]

    def _check_cached(self, urls: list[str], what: str, train: bool) -> None:
        rec = self._cached_record(urls, what)
        if rec is None:
            return
        h = self.hparams
        if rec.get("image_size") is not None and int(rec["image_size"]) != h.image_size:
            raise ValueError(f"{what}: the shards in {rec['shard_dir']} were encoded at {rec['image_size']} px "
                             f"(base.json) but data.image_size is {h.image_size}; set data.image_size: "
                             f"{rec['image_size']} or re-encode with mcm data encode --image-size {h.image_size}")
        if not train or self._warned_cached:
            return
        self._warned_cached = True
        off, silence = [], []
        if tuple(h.crop_scale) != (1.0, 1.0):
            off.append(f"random crop (crop_scale={list(h.crop_scale)}: a latent cannot be cropped)")
            silence.append("data.crop_scale: [1, 1]")
        if h.hflip > 0 and (rec.get("predictions") or not rec.get("flip", True)):
            why = "the cached predictions were drawn for the unflipped image" if rec.get("predictions") else \
                "encoded with --no-flip, no latent_flip.npy"
            off.append(f"horizontal flip ({why})")
            silence.append("data.hflip: 0")
        if off:
            log.warning("%s: cached shards in %s: %s disabled; set %s to silence this", what, rec["shard_dir"],
                        " and ".join(off), " and ".join(silence))

    @property
    def cached_base(self) -> dict | None:
        """The base the shards were encoded for (``base.json``: ``source``, ``hash``, ``family``, ``image_size``,
        ... plus ``shard_dir``), or ``None`` for raw shards.  From the training shards (else val / test)."""
        h = self.hparams
        for spec, what in ((h.train_shards, "train_shards"), (h.val_shards, "val_shards"),
                           (h.test_shards, "test_shards")):
            if spec:
                rec = self._cached_record(expand_shards(spec, what), what)
                if rec is not None:
                    return rec
        return None

    # ---- Lightning hooks -----------------------------------------------------------------
    def train_dataloader(self) -> FixedLengthLoader:
        if not self.hparams.train_shards:
            raise ValueError("data.train_shards is not set; expected a path or pattern of training shards")
        return self._make(self.hparams.train_shards, True, self.hparams.train_samples, "train_shards")

    def val_dataloader(self) -> FixedLengthLoader | list:
        if not self.hparams.val_shards:
            return []
        return self._make(self.hparams.val_shards, False, self.hparams.val_samples, "val_shards")

    def test_dataloader(self) -> FixedLengthLoader:
        spec = self.hparams.test_shards or self.hparams.val_shards
        if not spec:
            raise ValueError("data.test_shards (or data.val_shards) must be set to test or predict")
        return self._make(spec, False, None, "test_shards")

    predict_dataloader = test_dataloader

    def skipped_samples(self) -> int:
        return sum(l.skipped for l in self.loaders.values())

