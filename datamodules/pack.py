"""``mcm data pack``: user folders -> webdataset shards with the keys of docs/concepts.md#data-and-shard-keys.

Files are paired by *stem* (file name without extension) across the folders given; only the
top level of each folder is read.

- ``--images``: ``.png .jpg .jpeg .webp``. Each is decoded with PIL (``verify`` then ``load``).
  PNG and JPEG bytes are kept unchanged (keys ``png`` / ``jpg``); other formats become ``png``.
- ``--seg``: ``.png`` label ids, 8-bit mode ``L`` or ``P`` (the raw palette indices are kept,
  never mapped to colours) -> ``seg.png``.  Required for every image when given.
- ``--depth``: 8- or 16-bit single-channel ``.png`` (8-bit values are scaled by 257) or a
  ``.npy`` float array in [0, 1] (``numpy.load(allow_pickle=False)``) -> 16-bit ``depth.png``,
  0 = nearest.  Required for every image when given.
- ``--sketch``: ``.png`` in any mode, stored greyscale -> ``sketch.png``.  Optional per image.
- ``--captions``: chosen by extension (see ``load_captions``) -> ``txt``.  Required per image.
- ``--derive segmentation,depth,sketch``: maps a sample lacks are derived from its image instead (a map
  found in ``--seg`` / ``--depth`` / ``--sketch`` is kept): ``segmentation`` by the local segmenter
  ``--segmenter DIR`` with its labels mapped by ``--label-map FILE`` -> ``seg.png`` uint8 ids;
  ``depth`` by the local depth model ``--depth-model DIR`` (``--depth-kind``) -> 16-bit ``depth.png``,
  0 = nearest; ``sketch`` by the sketch plugin's Canny detector -> ``sketch.png``.  A model directory is
  ``save_pretrained`` of a ``transformers`` model and its image processor (``modalities.annotators``
  says which models and how depth is converted); nothing is downloaded.

Every sample also gets a ``json`` with its source file names and size.  Webdataset splits a
member name at the first dot, so dots in stems become ``_`` (the original stem is in the json).
Samples with problems are skipped, logged by name with the reason, and counted in the
returned ``PackReport``; each finished shard is renamed into place (never half-written).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .captions import IMAGE_EXTS, load_captions
from .devices import resolve_device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAP_EXTS = {"seg": (".png",), "depth": (".png", ".npy"), "sketch": (".png",)}
MAP_KEYS = {"seg": "seg.png", "depth": "depth.png", "sketch": "sketch.png"}
REQUIRED_MAPS = ("seg", "depth")  # a missing sketch is fine: docs/concepts.md#data-and-shard-keys makes it optional


@dataclass
class Problem:
    """One skipped file or sample: ``name`` (folder/file) and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class PackReport:
    """What ``pack_folder`` did.  Every skipped sample or stray file is in exactly one list."""

    packed: int = 0  # written, training and validation together
    shards: list[str] = field(default_factory=list)
    val_packed: int = 0  # of them, in the validation split (--val-fraction)
    val_shards: list[str] = field(default_factory=list)
    unpaired: list[Problem] = field(default_factory=list)  # missing partner, stray map, no caption
    unreadable: list[Problem] = field(default_factory=list)  # PIL / numpy could not decode, wrong mode
    size_mismatch: list[Problem] = field(default_factory=list)  # map size != image size
    renamed_keys: dict[str, str] = field(default_factory=dict)  # stem -> sample key, when sanitized
    without_sketch: int = 0  # packed samples with no sketch while --sketch was given
    unused_captions: list[str] = field(default_factory=list)  # caption stems with no image
    derived: dict[str, int] = field(default_factory=dict)  # map ("seg", "depth", "sketch") -> samples derived

    @property
    def skipped(self) -> int:
        return len(self.unpaired) + len(self.unreadable) + len(self.size_mismatch)

    def summary(self) -> str:
        val = (f" ({self.packed - self.val_packed} train, {self.val_packed} validation in {len(self.val_shards)} "
               f"shards)") if self.val_shards else ""
        return (f"packed {self.packed} samples into {len(self.shards) + len(self.val_shards)} shards{val}; "
                f"skipped {self.skipped} "
                f"(unpaired {len(self.unpaired)}, unreadable {len(self.unreadable)}, "
                f"size mismatch {len(self.size_mismatch)})")


class SampleError(Exception):
    """A sample that cannot be packed; ``kind`` is ``"unreadable"`` or ``"size_mismatch"``."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.kind, self.problem = kind, Problem(name, reason)


# ---- reading one file -------------------------------------------------------------------------

def _label(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _open_checked(path: Path, data: bytes) -> Image.Image:
    """Decode ``data`` fully with PIL (``verify`` for structure, then ``load`` for pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except UnidentifiedImageError:
        raise SampleError("unreadable", _label(path), "not a recognised image format") from None
    except Exception as e:  # PIL raises a zoo of types (OSError, SyntaxError, ValueError ...)
        raise SampleError("unreadable", _label(path), f"corrupt image ({type(e).__name__}: {e})") from None


def _png(arr_or_image: np.ndarray | Image.Image) -> bytes:
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def read_image(path: Path) -> tuple[str, bytes, tuple[int, int]]:
    """-> (shard key ``png``/``jpg``, bytes, (W, H)); PNG and JPEG bytes are kept as they are."""
    data = path.read_bytes()
    im = _open_checked(path, data)
    if im.format == "JPEG":
        return "jpg", data, im.size
    if im.format == "PNG":
        return "png", data, im.size
    if im.mode not in ("RGB", "RGBA", "L", "LA"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    return "png", _png(im), im.size


def read_seg(path: Path) -> tuple[bytes, tuple[int, int]]:
    """Label ids as an 8-bit ``L`` png; ``P`` images keep their raw palette indices."""
    im = _open_checked(path, path.read_bytes())
    if im.mode not in ("L", "P"):
        raise SampleError("unreadable", _label(path),
                          f"expected 8-bit label ids (PNG mode L or P), got mode {im.mode}; "
                          "colour-coded masks must be converted to class ids first")
    ids = np.asarray(im, dtype=np.uint8)  # for mode P these are the palette indices
    return _png(ids), im.size


def read_depth(path: Path) -> tuple[bytes, tuple[int, int]]:
    """Depth as a 16-bit png (0 = nearest) from an 8/16-bit png or a float ``.npy`` in [0, 1]."""
    if path.suffix.lower() == ".npy":
        d16 = _npy_depth(path)
        return _png(d16), (d16.shape[1], d16.shape[0])
    im = _open_checked(path, path.read_bytes())
    if im.mode == "L":
        d16 = np.asarray(im, dtype=np.uint16) * np.uint16(257)
    elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
        d = np.asarray(im, dtype=np.int64)
        if d.size and (d.min() < 0 or d.max() > 65535):
            raise SampleError("unreadable", _label(path), f"depth values {d.min()}..{d.max()} do not fit 16 bits")
        d16 = d.astype(np.uint16)
    else:
        raise SampleError("unreadable", _label(path),
                          f"expected a single-channel 8- or 16-bit depth png (mode L or I;16), got mode {im.mode}")
    return _png(d16), im.size


def _npy_depth(path: Path) -> np.ndarray:
    """A float (H, W) or (H, W, 1) ``.npy`` in [0, 1] -> (H, W) uint16; never unpickles."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError for object arrays, OSError / EOFError for junk
        raise SampleError("unreadable", _label(path), f"not a plain .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise SampleError("unreadable", _label(path), f"expected a float array, got {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise SampleError("unreadable", _label(path), f"expected shape (H, W) or (H, W, 1), got {arr.shape}")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise SampleError("unreadable", _label(path),
                          f"expected finite values in [0, 1], got range [{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]")
    return np.round(arr.astype(np.float64) * 65535.0).astype(np.uint16)


def read_sketch(path: Path) -> tuple[bytes, tuple[int, int]]:
    """A sketch in any mode as a greyscale png (transparent pixels become white)."""
    im = _open_checked(path, path.read_bytes())
    if "A" in im.getbands() or im.mode == "P":
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im)
    return _png(im.convert("L")), im.size


READERS = {"seg": read_seg, "depth": read_depth, "sketch": read_sketch}


# ---- pairing by stem --------------------------------------------------------------------------

#: the metadata files a diffusers / HF imagefolder keeps beside its images: not images, and expected there
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _index_dir(folder: Path, exts: tuple[str, ...], what: str) -> dict[str, list[Path]]:
    """stem -> files of ``folder`` with one of ``exts`` (more than one file means an ambiguous stem)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--{what}: {str(folder)!r} is not a directory")
    by_stem: dict[str, list[Path]] = {}
    ignored = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in IMAGEFOLDER_METADATA:
            continue
        if p.suffix.lower() in exts:
            by_stem.setdefault(p.stem, []).append(p)
        else:
            ignored.append(p.name)
    if ignored:
        log.warning("--%s: ignoring %d files that are not %s: %s", what, len(ignored), "/".join(exts),
                    ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    return by_stem


def _drop_ambiguous(indexed: dict[str, dict[str, list[Path]]], report: PackReport) -> dict[str, dict[str, Path]]:
    """One file per stem and folder; a stem with several files in any folder skips that sample."""
    ambiguous = sorted({s for files in indexed.values() for s, ps in files.items() if len(ps) > 1})
    for stem in ambiguous:
        files = [p for by_stem in indexed.values() for p in by_stem.get(stem, [])]
        where = sorted({p.parent.name for by_stem in indexed.values() if len(by_stem.get(stem, [])) > 1
                        for p in by_stem[stem]})
        report.unpaired.append(Problem(", ".join(_label(p) for p in files),
                                       f"several files in {', '.join(w + '/' for w in where)} share the stem "
                                       f"{stem!r}; rename all but one"))
    return {w: {s: ps[0] for s, ps in files.items() if s not in ambiguous} for w, files in indexed.items()}


def _sample_key(stem: str, used: set[str]) -> str:
    """Webdataset splits member names at the first dot: ``a.b`` -> ``a_b`` (made unique)."""
    key = base = stem.replace(".", "_")
    n = 1
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


# ---- writing ----------------------------------------------------------------------------------

def check_pattern(out: str) -> None:
    """``out`` must be a ShardWriter pattern with one shard-number placeholder."""
    try:
        distinct = (out % 0) != (out % 1)
    except (TypeError, ValueError):
        distinct = False
    if not distinct:
        raise ValueError(f"--out {out!r} must contain one shard-number placeholder such as %06d, "
                         "e.g. out/train-%06d.tar")


class AtomicShardSink:
    """``webdataset.ShardWriter`` that opens its first shard only when a sample arrives and
    renames each finished ``*.tar.tmp`` into place, so a shard is either complete or absent."""

    def __init__(self, pattern: str, maxcount: int) -> None:
        self.pattern, self.maxcount = pattern, maxcount
        self.shards: list[str] = []
        self._writer = None

    def write(self, sample: dict) -> None:
        if self._writer is None:
            import webdataset as wds

            Path(self.pattern % 0).parent.mkdir(parents=True, exist_ok=True)
            self._writer = wds.ShardWriter(self.pattern + ".tmp", maxcount=self.maxcount, verbose=0,
                                           post=self._publish)
        self._writer.write(sample)

    def _publish(self, tmp: str) -> None:
        final = tmp.removesuffix(".tmp")
        os.replace(tmp, final)
        self.shards.append(final)

    def __enter__(self) -> AtomicShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is None:
            return
        if exc_type is None:
            self._writer.close()
        elif self._writer.tarstream is not None:  # failed mid-shard: drop the partial file
            self._writer.tarstream.close()
            Path(self._writer.fname).unlink(missing_ok=True)


# ---- the whole folder -------------------------------------------------------------------------

def _pair(images: dict[str, Path], maps: dict[str, dict[str, Path]], folders: dict[str, Path],
          captions: dict[str, str] | None, captions_name: str, report: PackReport,
          derived: Sequence[str] = ()) -> list[str]:
    """Stems whose required partners all exist; the rest go to ``report.unpaired``."""
    stems = []
    for stem, img in images.items():
        missing = [f"no {w} file with stem {stem!r} in {folders[w].name}/ (expected {' or '.join(MAP_EXTS[w])})"
                   for w in REQUIRED_MAPS if w in maps and w not in derived and stem not in maps[w]]
        if captions is not None and stem not in captions:
            missing.append(f"no caption for {stem!r} in {captions_name}")
        if missing:
            report.unpaired.append(Problem(_label(img), "; ".join(missing)))
        else:
            stems.append(stem)
    for what, files in maps.items():
        where = folders["images"].name
        report.unpaired += [Problem(_label(p), f"{what} file has no image with stem {s!r} in {where}/")
                            for s, p in files.items() if s not in images]
    if captions is not None:
        report.unused_captions = sorted(s for s in captions if s not in images)
    return stems


def _build_sample(key: str, stem: str, image: Path, maps: dict[str, Path], caption: str | None,
                  derivers: Mapping[str, Callable] | None = None) -> dict:
    """The webdataset sample for one stem; raises ``SampleError`` for unreadable files or sizes.

    ``derivers``: the maps to derive when ``maps`` lacks them; such a sample lists them in its ``json``'s
    ``derived`` and keeps its RGB image under ``__rgb__`` for :func:`derive_maps`, which fills them in."""
    ext, data, size = read_image(image)
    sample: dict = {"__key__": key, ext: data}
    meta: dict = {"stem": stem, "files": {"image": image.name}, "width": size[0], "height": size[1]}
    if key != stem:
        meta["key_sanitized_from"] = stem
    for what, path in maps.items():
        png, map_size = READERS[what](path)
        if map_size != size:
            raise SampleError("size_mismatch", _label(path), f"{what} is {map_size[0]}x{map_size[1]} (WxH) "
                                                             f"but image {image.name} is {size[0]}x{size[1]}")
        sample[MAP_KEYS[what]] = png
        meta["files"][what] = path.name
    missing = [w for w in (derivers or {}) if MAP_KEYS[w] not in sample]
    if missing:
        import torch  # only deriving needs it

        rgb = np.asarray(_open_checked(image, data).convert("RGB"), dtype=np.float32) / 255.0
        sample["__rgb__"] = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) in [0, 1], for derive_maps
        meta["derived"] = missing
    if caption is not None:
        sample["txt"] = caption
    sample["json"] = json.dumps(meta)
    return sample


def derive_maps(samples: list[dict], derivers: Mapping[str, Callable]) -> None:
    """Fill in the maps each sample of ``samples`` lacks (its ``json``'s ``derived``), one annotator call per
    map and image size: photos of one size, the common case, go through each model as one batch."""
    import torch

    lacking = [(s, json.loads(s["json"]).get("derived", [])) for s in samples]
    for what, derive in derivers.items():
        by_size: dict[tuple, list[dict]] = {}
        for s, derived in lacking:
            if what in derived:
                by_size.setdefault(tuple(s["__rgb__"].shape), []).append(s)
        for group in by_size.values():
            for s, png in zip(group, derive(torch.stack([s["__rgb__"] for s in group]))):
                s[MAP_KEYS[what]] = png
    for s in samples:
        s.pop("__rgb__", None)


DERIVABLE = {"segmentation": "seg", "depth": "depth", "sketch": "sketch"}  # --derive name -> map


def make_derivers(derive: Sequence[str], segmenter: str | Path | None = None, label_map: str | Path | None = None,
                  depth_model: str | Path | None = None, depth_kind: str = "auto",
                  device: str = "cpu") -> dict[str, Callable[[torch.Tensor], list[bytes]]]:
    """``{"seg" | "depth" | "sketch": images (B, 3, H, W) in [0, 1] -> B PNGs}`` for ``--derive``.

    Each goes through its modality plugin's ``derive`` (with the local model as ``annotator``), so a
    derived map is exactly what the plugin would make from the photo at inference."""
    import modalities
    from modalities.annotators import load_depth_model, load_segmenter

    unknown = sorted(set(derive) - set(DERIVABLE))
    if unknown:
        raise ValueError(f"--derive {unknown}: can derive only {sorted(DERIVABLE)}")
    for name, model, flag in (("segmentation", segmenter, "--segmenter"), ("depth", depth_model, "--depth-model")):
        if name in derive and model is None:
            raise ValueError(f"--derive {name} needs {flag} DIR (a local transformers model directory)")
        if model is not None and name not in derive:
            raise ValueError(f"{flag} {str(model)!r} is only used with --derive {name}")
    if label_map is not None and segmenter is None:
        raise ValueError(f"--label-map {str(label_map)!r} maps a segmenter's labels; give --segmenter too")
    out: dict[str, Callable[[torch.Tensor], list[bytes]]] = {}
    if "segmentation" in derive:
        annotator = load_segmenter(segmenter, label_map, device=device)
        if annotator.label_map is not None and annotator.label_map.ignored:
            raise ValueError(f"--label-map {str(label_map)!r}: \"ignore\" has no meaning in a derived seg.png "
                             f"(segmenter ids {annotator.label_map.ignored}); map them to 0 or a class")
        if annotator.num_classes > 256:
            raise ValueError(f"--segmenter {str(segmenter)!r}: {annotator.num_classes} classes do not fit the uint8 "
                             "seg.png; give --label-map to fewer classes")
        plugin = modalities.get("segmentation", num_classes=annotator.num_classes)
        out["seg"] = lambda imgs: [_png(m.cpu().numpy().astype(np.uint8))
                                   for m in plugin.derive(imgs, {}, annotator=annotator)]
    if "depth" in derive:
        depth_annotator = load_depth_model(depth_model, depth_kind, device=device)
        depth_plugin = modalities.get("depth")
        out["depth"] = lambda imgs: [_png(depth_to_uint16(d[0].cpu()))
                                     for d in depth_plugin.derive(imgs, {}, annotator=depth_annotator)]
    if "sketch" in derive:
        sketch_plugin = modalities.get("sketch")
        # Canny runs per image (its thresholds adapt to each photo)
        out["sketch"] = lambda imgs: [_png((sketch_plugin.derive(img, {})[0].numpy() * 255).round().astype(np.uint8))
                                      for img in imgs]
    return out


def depth_to_uint16(depth: torch.Tensor) -> np.ndarray:
    """Depth ``(H, W)`` in [0, 1] -> ``depth.png``'s uint16 ``round(65535 * d)``."""
    return np.round(depth.double().clamp(0, 1).numpy() * 65535.0).astype(np.uint16)


def val_pattern(out: str) -> str:
    """Where ``--val-fraction``'s shards go: beside ``out``, ``train`` in its file name becoming ``val``
    (``DIR/train-%06d.tar`` -> ``DIR/val-%06d.tar``), else ``val-`` before it."""
    folder, _, name = out.rpartition("/")
    name = name.replace("train", "val", 1) if "train" in name else f"val-{name}"
    return f"{folder}/{name}" if folder else name


def in_validation(stem: str, fraction: float) -> bool:
    """The deterministic split: a sample is in validation when the hash of its stem falls below ``fraction``
    (the same sample lands in the same split whatever the folder's order or size)."""
    return zlib.crc32(stem.encode("utf-8")) / 2**32 < fraction


def pack_folder(images: str | Path, out: str, seg: str | Path | None = None, depth: str | Path | None = None,
                sketch: str | Path | None = None, captions: str | Path | None = None,
                maxcount: int = 1000, derivers: Mapping[str, Callable[[torch.Tensor], list[bytes]]] | None = None,
                val_fraction: float = 0.0, batch_size: int = 16) -> PackReport:
    """Pack ``images`` (+ maps paired by stem, + captions) into shards ``out % 0, out % 1, ...``.

    Args:
        images: folder of .png/.jpg/.jpeg/.webp images.
        out: ShardWriter pattern, e.g. ``"out/train-%06d.tar"``; its folder is created.
        seg, depth, sketch: optional folders of maps (see the module docstring for formats).
        captions: optional captions file (see ``load_captions``).
        maxcount: samples per shard (default 1000).
        derivers: ``make_derivers(...)``: maps a sample lacks are derived from its image.
        val_fraction: this fraction of the samples (by a hash of the stem, :func:`in_validation`) goes to
            validation shards beside the training ones (:func:`val_pattern`); 0 = none.
        batch_size: images per annotator call when deriving (same-size images are batched).
    Returns: a ``PackReport``; problems are also logged at WARNING, each by file name.
    """
    # 1. check arguments and index the folders
    check_pattern(out)
    if maxcount < 1 or batch_size < 1:
        raise ValueError(f"--maxcount and --batch-size must be >= 1, got {maxcount} and {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction: expected a fraction in [0, 1), got {val_fraction}")
    report = PackReport()
    folders = {"images": Path(images)}
    folders |= {w: Path(f) for w, f in (("seg", seg), ("depth", depth), ("sketch", sketch)) if f is not None}
    exts = {"images": IMAGE_EXTS, **MAP_EXTS}
    indexed = _drop_ambiguous({w: _index_dir(f, exts[w], w) for w, f in folders.items()}, report)
    image_files = indexed.pop("images")
    maps = indexed
    caps = load_captions(Path(captions)) if captions is not None else None

    # 2. pair by stem, 3. decode, check and write each sample
    derivers = dict(derivers or {})
    stems = _pair(image_files, maps, folders, caps, Path(captions).name if captions else "", report, list(derivers))
    used: set[str] = set()
    with AtomicShardSink(out, maxcount) as sink, AtomicShardSink(val_pattern(out), maxcount) as val_sink:
        bar = tqdm(total=len(stems), desc="mcm data pack", unit="sample", disable=None)
        for start in range(0, len(stems), batch_size):  # a chunk at a time: the annotators run batched
            chunk = []
            for stem in stems[start:start + batch_size]:
                sample_maps = {w: files[stem] for w, files in maps.items() if stem in files}
                try:
                    chunk.append(_build_sample(_sample_key(stem, used), stem, image_files[stem], sample_maps,
                                               caps[stem] if caps is not None else None, derivers))
                except SampleError as e:
                    getattr(report, e.kind).append(e.problem)
            derive_maps(chunk, derivers)
            for sample in chunk:
                meta = json.loads(sample["json"])
                stem = meta["stem"]
                if sample["__key__"] != stem:
                    report.renamed_keys[stem] = sample["__key__"]
                val = in_validation(stem, val_fraction)
                (val_sink if val else sink).write(sample)
                report.packed += 1
                report.val_packed += val
                report.without_sketch += "sketch" in maps and "sketch.png" not in sample
                for what in meta.get("derived", []):
                    report.derived[what] = report.derived.get(what, 0) + 1
            bar.update(min(batch_size, len(stems) - start))
            bar.set_postfix(packed=report.packed, skipped=report.skipped, refresh=False)
        bar.close()
    report.shards, report.val_shards = sink.shards, val_sink.shards
    log_report(report)
    return report


def log_report(report: PackReport) -> None:
    """Every problem by name at WARNING, then the counts and the summary line."""
    for kind in ("unpaired", "unreadable", "size_mismatch"):
        for p in getattr(report, kind):
            log.warning("%s: %s", kind.replace("_", " "), p)
    if report.unused_captions:
        log.warning("captions with no image (%d): %s", len(report.unused_captions),
                    ", ".join(report.unused_captions[:10]) + (" ..." if len(report.unused_captions) > 10 else ""))
    if report.renamed_keys:
        log.info("%d stems contain dots; their sample keys use '_' instead (e.g. %s)", len(report.renamed_keys),
                 ", ".join(f"{s!r} -> {k!r}" for s, k in list(report.renamed_keys.items())[:3]))
    if report.without_sketch:
        log.info("%d packed samples have no sketch", report.without_sketch)
    for what, count in report.derived.items():
        log.info("%s derived for %d samples", MAP_KEYS[what], count)
    log.log(logging.WARNING if report.skipped else logging.INFO, "%s", report.summary())


# ---- CLI ------------------------------------------------------------------------------------

def _cmd_pack(a: argparse.Namespace) -> int:
    try:
        derive = [x for arg in (a.derive or []) for x in arg.split(",") if x]
        derivers = make_derivers(derive, a.segmenter, a.label_map, a.depth_model, a.depth_kind, a.device)
        report = pack_folder(a.images, a.out, seg=a.seg, depth=a.depth, sketch=a.sketch, captions=a.captions,
                             maxcount=a.maxcount, derivers=derivers, val_fraction=a.val_fraction,
                             batch_size=a.batch_size)
    except (ValueError, OSError) as e:
        log.error("mcm data pack: %s", e)
        return 2
    return 0 if report.packed else 1


def add_command(data: argparse._SubParsersAction) -> None:
    """Attach ``mcm data pack`` and ``mcm data inspect`` to the ``mcm data`` group."""
    p = data.add_parser("pack", help="pack folders of images (+ seg/depth/sketch maps, captions) into shards",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of .png/.jpg/.jpeg/.webp images")
    p.add_argument("--seg", help="folder of label-id pngs (mode L or P), same stems as the images")
    p.add_argument("--depth", help="folder of 8/16-bit depth pngs or float .npy in [0,1], 0 = nearest")
    p.add_argument("--sketch", help="folder of sketch pngs (optional per image)")
    p.add_argument("--captions", help="captions: .json {stem: caption}, .jsonl (an imagefolder metadata.jsonl with "
                   "file_name and text/caption too) or .tsv/.txt (stem<TAB>caption)")
    p.add_argument("--out", required=True, help="shard pattern, e.g. out/train-%%06d.tar")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="put this fraction of the samples (chosen by a hash of the file stem) in validation shards "
                   "beside the training ones: --out DIR/train-%%06d.tar -> DIR/val-%%06d.tar (default 0)")
    p.add_argument("--derive", action="append", metavar="MAPS",
                   help="derive the maps a sample lacks from its image: segmentation,depth,sketch (comma-separated)")
    p.add_argument("--segmenter", metavar="DIR", help="--derive segmentation: local transformers segmenter "
                   "(save_pretrained dir: config.json, model.safetensors, preprocessor_config.json)")
    p.add_argument("--label-map", metavar="FILE", help="JSON/YAML from --segmenter's labels (id2label names or ids) "
                   "to class ids, e.g. {\"person\": 1, \"car\": 2}; unmapped -> 0 (default: its own ids)")
    p.add_argument("--depth-model", metavar="DIR", help="--derive depth: local transformers depth model dir")
    p.add_argument("--depth-kind", choices=("auto", "inverse", "metric"), default="auto",
                   help="--depth-model output: inverse depth (DPT, Depth Anything) or metric (default auto: by type)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per annotator call when deriving (same-size photos are batched; default 16)")
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=_cmd_pack)

    from .inspect_shards import add_inspect_command

    add_inspect_command(data)
