"""``mcm data encode``: shards -> cached shards whose samples carry the frozen base's VAE latents and text
embeddings (and, with ``--predictions K``, its predictions), so training skips those encoders.

    mcm data encode --base DIR data/train-*.tar --out data/train_sd15 [--image-size 512] [--workers 2]

Each input shard becomes one output shard of the same name in ``--out``: every original member
unchanged, plus the members of :mod:`datamodules.cached_fields` (``latent.npy``, ``latent_flip.npy``,
``text_emb.npy`` and, for SDXL / SD3, one member per entry of the context dict).  The same
DataModule config reads raw and cached shards.

* Latents are the VAE posterior's **mean**, not a sample.  Diffusers' train scripts cache one
  ``latent_dist.sample()``, but a sample cached once is one fixed draw reused every epoch, no
  augmentation; the mean is deterministic, so ``FrozenBase.encode_images`` (which returns the mean
  as well) computes the same latent from the raw image and draws nothing from torch's RNG: training
  from cached shards gives the loss of training from raw shards, same seed (``tests/test_encode.py``).
* The image is presented as the DataModule presents it without random augmentation (shorter side
  resized to ``--image-size``, centre crop; ``joint_transform(size, None)``); ``latent_flip`` is the
  latent of that image mirrored.  Training on cached shards cannot crop (see ``ShardDataModule``).
* ``OUTDIR/base.json`` records the base's ``source`` and ``content_hash()`` (and family, image size,
  members, K); training refuses shards encoded for another base (``BaseMismatchError``), and a rerun
  into the same ``--out`` with another base or other settings is refused.
* Resumable: a shard is written to ``NAME.tmp`` and renamed when complete; a rerun skips complete
  shards and redoes partial ones.  ``--workers W`` encodes W shards at once, each worker process
  loading the base once (``W=0``: in this process); the output bytes do not depend on W.
* Many GPUs or nodes: ``--devices N [--num-nodes M]`` runs the encoding through Lightning's
  ``Trainer.predict`` under DDP (:mod:`mcm.training.encode_distributed`), each rank encoding its own share of
  the shards; the bytes are those one process writes.  ``docs/multi_node.md`` shows torchrun and SLURM.
* Bad samples (unreadable image, bad class label, a truncated shard's last sample) are skipped,
  logged and counted as the DataModule counts them (:class:`~datamodules.sample_decoding.SkipCounter`).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import default_collate
from torchvision import tv_tensors
from webdataset.tariterators import base_plus_ext

from datamodules.cached_fields import (BASE_HASH_KEY, BASE_HASH_MEMBER, BASE_JSON, CACHED_KEYS, TEXT_KEY, array_bytes,
                                      context_members, decode_cached, member)
from datamodules.devices import resolve_device
from datamodules.sample_decoding import (IMAGE_EXPECTED, BadSampleError, ShardDecodeError, SkipCounter, decode_caption,
                              decode_class_label, decode_image, image_field, joint_transform)
from datamodules.shard_stream import TAR_ERRORS
from mcm.diffusion.forward_process import forward_process_for

log = logging.getLogger(__name__)

CACHED_SUFFIXES = tuple(member(k) for k in CACHED_KEYS) + (BASE_HASH_MEMBER,)


@dataclass(frozen=True)
class EncodeSettings:
    """What every worker needs to encode a shard (picklable)."""

    base: str
    image_size: int
    batch_size: int = 16
    flip: bool = True
    predictions: int = 0
    device: str = "cpu"
    dtype: str | None = None  # torch dtype name the base runs in; None: as stored


@dataclass
class EncodeReport:
    out: str
    shards_done: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # complete from an earlier run
    samples: int = 0
    bad: int = 0

    def summary(self) -> str:
        return (f"mcm data encode: {len(self.shards_done)} shards encoded, {len(self.shards_skipped)} skipped "
                f"(already complete), {self.samples} samples written, {self.bad} bad samples skipped -> {self.out}")


# ---- the base -------------------------------------------------------------------------------------

def load_base(settings: EncodeSettings):
    from mcm.models.frozen_base import FrozenBase

    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    return FrozenBase.from_pretrained(settings.base, torch_dtype=dtype).to(settings.device)


def base_record(base, settings: EncodeSettings) -> dict:
    """What ``base.json`` says: the base (hash) and how the shards were encoded."""
    members = [member("latent")] + ([member("latent_flip")] if settings.flip else [])
    context = None
    if base.is_text_conditional:
        ctx = base.encode_context([""], batch_size=1, image_size=(settings.image_size,) * 2)
        members += [member(k) for k in context_members(ctx)]
        context = "dict" if isinstance(ctx, dict) else "tensor"
    elif base.is_class_conditional:
        context = "class_label"
    return {"source": str(base.source), "hash": base.content_hash(), "family": base.family,
            "image_size": settings.image_size, "latent_shape": [base.latent_channels] + [
                settings.image_size // base.downsample] * 2, "members": members, "context": context,
            "flip": settings.flip, "predictions": settings.predictions, "dtype": settings.dtype or "float32",
            **({"timestep_density": prediction_density(base)} if settings.predictions else {}), "format": 1}


def prediction_density(base) -> str:
    """The density cached prediction draws come from: the base's default training forward process's."""

    return forward_process_for(base.scheduler).timestep_density


def check_base_json(out: Path, record: dict) -> bool:
    """Whether ``out/base.json`` exists; a :class:`ValueError` if it describes another encoding than ``record``."""
    path = out / BASE_JSON
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    keys = ("hash", "image_size", "flip", "predictions", "members", "dtype")
    # a base.json written before "dtype" was recorded: those encodings ran in float32 or said nothing
    old.setdefault("dtype", record["dtype"])
    diff = {k: (old.get(k), record[k]) for k in keys if old.get(k) != record[k]}
    if diff:
        raise ValueError(f"--out {out}: holds shards encoded for base '{old.get('source')}' "
                         f"(sha256 {str(old.get('hash'))[:12]}...) with other settings "
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                         + "; use another --out folder or delete it")
    return True


def write_base_json(out: Path, record: dict) -> None:
    """Write ``out/base.json``, or check that the one there describes the same encoding."""
    if check_base_json(out, record):
        return
    path = out / BASE_JSON
    tmp = path.with_name(BASE_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


# ---- reading and presenting samples ---------------------------------------------------------------

def read_samples(path: str, counter: SkipCounter) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """``(key, [(member info, bytes), ...])`` per sample, webdataset's grouping (adjacent members, key up to the
    first dot).  A shard that breaks mid-way counts the sample being read as bad and ends there."""
    key, members = None, []
    try:
        with tarfile.open(path) as tf:
            for info in tf:
                if not info.isfile():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue  # no extension: webdataset ignores it too
                data = tf.extractfile(info).read()
                if prefix != key:
                    if members:
                        yield key, members
                    key, members = prefix, []
                members.append((info, data))
    except TAR_ERRORS as e:
        counter(BadSampleError(f"shard {path}, sample '{key}': shard unreadable after member "
                               f"{members[-1][0].name if members else None!r}, dropping the rest "
                               f"({type(e).__name__}: {e})"))
        return
    if members:
        yield key, members


def present(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 image as the DataModule gives it without random augmentation, in [-1, 1]."""
    out = joint_transform(image_size, None)(tv_tensors.Image(image))
    return out.as_subclass(torch.Tensor).float() / 127.5 - 1.0


def _check_sample(shard: str, key: str, fields: dict[str, bytes]) -> tuple[torch.Tensor, int | None]:
    """The image and class label, or a :class:`ShardDecodeError` as the DataModule would raise it."""
    field_, expected = image_field(fields), IMAGE_EXPECTED
    try:
        image = decode_image(fields)
        field_, expected = "'cls' / json 'class_label'", "an integer class label"
        return image, decode_class_label(fields)
    except BadSampleError as e:
        raise ShardDecodeError.of(shard, key, field_, expected, str(e)) from e


# ---- one shard ------------------------------------------------------------------------------------

@torch.no_grad()
def encode_batch(base, settings: EncodeSettings, images: list[torch.Tensor], captions: list[str],
                 labels: list[int | None], keys: list[str]) -> list[dict[str, bytes]]:
    """The cached members (suffix -> ``.npy`` bytes) of a batch of presented images ``(3, S, S)``."""
    B, S = len(images), settings.image_size
    x = torch.stack(images).to(base.device)  # (B, 3, S, S) in [-1, 1]
    lat = base.encode_images(torch.cat([x, x.flip(-1)]) if settings.flip else x)  # (B or 2B, C, h, w)
    arrays: dict[str, torch.Tensor] = {"latent": lat[:B]}
    if settings.flip:
        arrays["latent_flip"] = lat[B:]
    context = None
    if base.is_text_conditional:
        context = base.encode_context(captions, batch_size=B, image_size=(S, S))
        arrays.update(context_members(context))
    base_hash = base.content_hash().encode("ascii")
    out = [{member(k): array_bytes(k, v[i]) for k, v in arrays.items()} | {BASE_HASH_MEMBER: base_hash}
           for i in range(B)]
    if settings.predictions > 0:
        from mcm.training.prediction_cache import prediction_members  # written alongside; imported when asked

        # the predictions are drawn for x0 and context exactly as the DataModule will read them back: through
        # its own decoder, from the bytes just written (fp16 rounding, integer masks as int64)
        stored = default_collate([{k: v for k, v in decode_cached(o).items() if k != BASE_HASH_KEY} for o in out])
        stored = {k: {n: x.to(base.device) for n, x in v.items()} if isinstance(v, dict) else v.to(base.device)
                  for k, v in stored.items()}
        x0 = stored["latent"]
        if base.is_class_conditional:
            if any(lb is None for lb in labels):
                missing = [k for k, lb in zip(keys, labels) if lb is None][:5]
                raise ValueError(f"--predictions: the base '{base.source}' is class-conditional but samples "
                                 f"{missing} have no class label ('cls' or json 'class_label')")
            context = base.encode_context(class_labels=labels, batch_size=B)
        elif context is not None:
            context = stored[TEXT_KEY]
        for o, extra in zip(out, prediction_members(base, x0, context, keys, settings.predictions)):
            o.update(extra)
    return out


def _new_member(like: tarfile.TarInfo, name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(like.mtime), like.mode
    info.uid, info.gid, info.uname, info.gname = like.uid, like.gid, like.uname, like.gname
    return info


def encode_shard(base, settings: EncodeSettings, src: str, dst: Path) -> dict:
    """Encode ``src`` into ``dst`` (through ``dst.tmp``); returns ``{"samples", "bad"}``."""
    counter, written = SkipCounter(), 0
    tmp = dst.with_name(dst.name + ".tmp")
    pending: list[tuple[str, list, torch.Tensor, str, int | None]] = []

    def flush(tf: tarfile.TarFile) -> int:
        if not pending:
            return 0
        cached = encode_batch(base, settings, [p[2] for p in pending], [p[3] for p in pending],
                              [p[4] for p in pending], [p[0] for p in pending])
        for (key, members, *_), extra in zip(pending, cached):
            for info, data in members:
                tf.addfile(info, io.BytesIO(data))
            for suffix, data in extra.items():
                tf.addfile(_new_member(members[0][0], f"{key}.{suffix}", len(data)), io.BytesIO(data))
        n = len(pending)
        pending.clear()
        return n

    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
            for key, members in read_samples(src, counter):
                # an already cached shard: its old cached members are replaced, never duplicated
                members = [(i, d) for i, d in members if base_plus_ext(i.name)[1] not in CACHED_SUFFIXES]
                fields = {base_plus_ext(i.name)[1]: d for i, d in members}
                try:
                    image, label = _check_sample(src, key, fields)
                except BadSampleError as e:
                    counter(e)
                    continue
                pending.append((key, members, present(image, settings.image_size), decode_caption(fields), label))
                if len(pending) == settings.batch_size:
                    written += flush(out)
            written += flush(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return {"samples": written, "bad": counter.count}


# ---- many shards ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(settings: EncodeSettings, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["settings"], _WORKER["base"] = settings, load_base(settings)


def _encode_job(job: tuple[str, str]) -> tuple[str, dict]:
    src, dst = job
    return src, encode_shard(_WORKER["base"], _WORKER["settings"], src, Path(dst))


def _plan(shards: list[str], out: Path) -> list[tuple[str, Path]]:
    dsts: dict[str, str] = {}
    for s in shards:
        name = os.path.basename(s.removeprefix("file:"))
        if name in dsts and dsts[name] != s:
            raise ValueError(f"shards {dsts[name]} and {s} have the same name {name!r}; each output shard is named "
                             f"after its input, so encode them into different --out folders")
        if (out / name).resolve() == Path(s.removeprefix("file:")).resolve():
            raise ValueError(f"--out {out}: would overwrite the input shard {s}; choose another folder")
        dsts[name] = s
    return [(s, out / n) for n, s in dsts.items()]


def pending_jobs(plan: list[tuple[str, Path]], report: EncodeReport) -> list[tuple[str, str]]:
    """The ``(src, dst)`` of ``plan`` still to encode; complete outputs go to ``report.shards_skipped`` (resume)."""
    jobs = []
    for src, dst in plan:
        if dst.is_file():
            log.info("%s: complete from an earlier run, skipping", dst)
            report.shards_skipped.append(str(dst))
            continue
        if dst.with_name(dst.name + ".tmp").exists():
            log.info("%s: partial from an interrupted run, encoding it again", dst)
        jobs.append((src, str(dst)))
    return jobs


def encode_shards(base: str, shards: list[str], out: str | Path, image_size: int | None = None,
                  batch_size: int = 16, workers: int = 0, predictions: int = 0, flip: bool = True,
                  device: str = "cpu", dtype: str | None = None, devices: int = 1, num_nodes: int = 1,
                  accelerator: str = "auto") -> EncodeReport:
    """Encode ``shards`` (paths, globs or brace patterns) for ``base`` into ``out``; see the module docstring.

    Args:
        base: a diffusers-layout directory or a built-in name (``shapes32``).
        image_size: side of the presented image in pixels; default the base's native size.
        batch_size: images per VAE / text-encoder call.  workers: parallel shards (0 = in-process).
        predictions: K noise draws of the base's predictions per sample (``mcm.training.prediction_cache``).
        flip: also cache the mirrored image's latent (``latent_flip.npy``).
        device / dtype: where and in which dtype (``float32``, ``float16``, ``bfloat16``) the base runs.
        devices / num_nodes / accelerator: more than one rank runs the encoding through Lightning
            (``mcm.training.encode_distributed``; ``device`` is then each rank's own, as Lightning assigns it).
    """
    from tqdm import tqdm

    from datamodules.shard_datamodule import expand_shards, is_remote

    if devices * num_nodes > 1:
        device = "cpu"  # loaded here, moved to each rank's device by Lightning
    if batch_size < 1 or workers < 0 or predictions < 0 or devices < 1 or num_nodes < 1:
        raise ValueError(f"--batch-size, --devices and --num-nodes must be >= 1, --workers and --predictions "
                         f">= 0; got {batch_size}, {devices}, {num_nodes}, {workers}, {predictions}")
    urls = [u for s in shards for u in expand_shards(s, "SHARDS")]
    if any(is_remote(u) for u in urls):
        raise ValueError("SHARDS: mcm data encode reads local shard files; copy remote shards first")
    out = Path(out)
    settings = EncodeSettings(base, image_size or 0, batch_size, flip, predictions, device, dtype)
    b = load_base(settings)
    if image_size is None:
        image_size = b.sample_size[0] * b.downsample
        settings = EncodeSettings(**{**asdict(settings), "image_size": image_size})
    multiple = 8 * b.downsample
    if image_size % multiple:
        raise ValueError(f"--image-size {image_size}: expected a multiple of {multiple} for the base '{base}' "
                         f"(8 x its x{b.downsample} VAE downsampling), as training needs")
    out.mkdir(parents=True, exist_ok=True)
    record = base_record(b, settings)
    if devices * num_nodes > 1:
        from mcm.training.encode_distributed import encode_distributed

        if workers:
            raise ValueError("--workers is for one process on one machine; with --devices / --num-nodes each "
                             "rank encodes its own shards (drop --workers)")
        check_base_json(out, record)  # on every rank, before any starts; rank 0 writes it
        return encode_distributed(b, settings, record, _plan(urls, out), out, devices, num_nodes, accelerator)
    write_base_json(out, record)
    report = EncodeReport(str(out))
    jobs = pending_jobs(_plan(urls, out), report)
    if workers == 0:
        results = ((src, encode_shard(b, settings, src, Path(dst))) for src, dst in jobs)
        pool = None
    else:
        del b  # each worker loads its own
        threads = max(1, torch.get_num_threads() // workers)
        # fork starts in a blink, but neither CUDA nor a multi-threaded OpenMP pool survives it (a forked
        # worker using more than one thread hangs): one thread per forked worker, else spawn
        ctx = mp.get_context("spawn" if device.startswith("cuda") or threads > 1 else "fork")
        pool = ctx.Pool(min(workers, max(1, len(jobs))), initializer=_init_worker, initargs=(settings, threads))
        results = pool.imap_unordered(_encode_job, jobs)
    bar = tqdm(total=len(jobs), unit="shard", desc="mcm data encode")
    try:
        for src, r in results:
            report.shards_done.append(src)
            report.samples += r["samples"]
            report.bad += r["bad"]
            bar.set_postfix(samples=report.samples, bad=report.bad, refresh=False)
            bar.update(1)
        if pool is not None:
            pool.close()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # after close(): waits for nothing; on an error: stops the other shards
            pool.join()
    log.log(logging.WARNING if report.bad else logging.INFO, "%s", report.summary())
    return report


# ---- CLI ------------------------------------------------------------------------------------------

def _cmd_encode(a: argparse.Namespace) -> int:
    try:
        report = encode_shards(a.base, a.shards, a.out, image_size=a.image_size, batch_size=a.batch_size,
                               workers=a.workers, predictions=a.predictions, flip=not a.no_flip, device=a.device,
                               dtype=None if a.dtype == "float32" else a.dtype, devices=a.devices,
                               num_nodes=a.num_nodes, accelerator=a.accelerator)
    except (ValueError, OSError) as e:
        log.error("mcm data encode: %s", e)
        return 2
    return 0 if report.samples or report.shards_skipped else 1


def add_command(data: argparse._SubParsersAction) -> None:
    """Attach ``mcm data encode`` to the ``mcm data`` group."""
    p = data.add_parser("encode", help="cache the base's VAE latents and text embeddings in shards",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base: diffusers-layout directory or built-in name (shapes32)")
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="input shards: paths, globs or brace patterns")
    p.add_argument("--out", required=True, help="output folder (one shard per input shard, same name, + base.json)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the base's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call (default 16)")
    p.add_argument("--workers", type=int, default=0, help="shards encoded in parallel processes (0: in-process)")
    p.add_argument("--predictions", type=int, default=0, metavar="K",
                   help="also cache the base's predictions for K noise draws per sample (default 0)")
    p.add_argument("--no-flip", action="store_true", help="do not cache latent_flip.npy (no flip in training)")
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--devices", type=int, default=1,
                   help="ranks per node; > 1 runs through Lightning under DDP, each rank encoding its own shards")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun / SLURM start one launcher per node)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"],
                   help="Lightning accelerator of the --devices ranks (default auto: GPUs when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the base runs in (default float32)")
    p.set_defaults(func=_cmd_encode)
