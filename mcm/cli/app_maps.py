"""``mcm app`` without Gradio, part 1: canvases <-> condition maps, map files, the region brush, held-out examples.

Everything here takes and returns numpy arrays, tensors and plain values, so ``tests/test_app.py``
checks it without a browser (part 2, sampling, scores and the Python call: :mod:`mcm.cli.app_session`).
A canvas is an RGB(A) uint8 image ``(h, w, 3|4)`` at a multiple of the
output size; the colours are those of the modality plugin's own ``visualize`` (label maps: one colour
per class, read back by nearest colour and a majority vote per output pixel; one-channel continuous
maps in [0, 1]: the colours of ``visualize`` on a ramp of values, read back by nearest colour and an
area mean).
"""
from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

UNKNOWN = 255  # the "unknown" label of label maps that allow one (partial_mask)
EXAMPLE_SEED = 1234  # the shapes generator seed of held-out examples (split "test", as `mcm demo`)
#: the value of an empty canvas, for continuous modalities whose 0 is not "nothing" (depth: 1 = farthest)
BLANK_VALUES = {"depth": 1.0}
MODALITY_ORDER = ("segmentation", "sketch", "depth", "partial_mask")  # canvases left to right; others after
RAMP = 256  # values sampled to invert a continuous modality's visualize


class AppError(ValueError):
    """A problem with what the user gave; shown in the page as it is."""


# ---- 1. canvases <-> maps ------------------------------------------------------------------------------
def _vis(plugin, raw: torch.Tensor) -> np.ndarray:
    """``plugin.visualize`` of a batched raw map -> ``(B, H, W, 3)`` uint8."""
    rgb = plugin.visualize(raw).float().clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1) * 255 + 0.5).to(torch.uint8).numpy()


def _accepts(plugin, raw: torch.Tensor) -> bool:
    try:
        plugin.validate(raw)
        return True
    except ValueError:
        return False


def class_names(plugin) -> list[str]:
    """Names of a label map's classes: the plugin's own ``class_names``, else the shapes dataset's when K matches."""
    names = getattr(plugin, "class_names", None)
    if names:
        return list(names)
    from datamodules.shapes import CLASS_NAMES

    k = plugin.num_classes
    return list(CLASS_NAMES) if k == len(CLASS_NAMES) else [f"class {i}" for i in range(k)]


@dataclass
class CanvasSpec:
    """How one modality is drawn: values, their colours (several colours may read as one value), a legend.

    ``kind``: ``"labels"`` (integer classes), ``"continuous"`` (one channel in [0, 1]) or ``"upload"``
    (no drawing: the map comes from a file).
    """

    name: str
    plugin: Any
    kind: str
    values: np.ndarray  # (N,) the value of each reference colour
    colors: np.ndarray  # (N, 3) uint8 reference colours
    legend: list[tuple[str, str]] = field(default_factory=list)  # (label, "#rrggbb") brush colours
    blank: float = 0.0  # value of an empty (or transparent) canvas
    binary: bool = False  # continuous maps trained on {0, 1} (sketch strokes) are thresholded

    @property
    def brush_colors(self) -> list[str]:
        return [c for _, c in self.legend]


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def canvas_spec(name: str, plugin) -> CanvasSpec:
    """The canvas of a modality plugin, from its ``visualize``."""
    if plugin.is_label_map:
        k = plugin.num_classes
        colors = _vis(plugin, torch.arange(k)[None, None])[0, 0]  # (K, 3)
        values, legend = list(range(k)), [(n, _hex(c)) for n, c in zip(class_names(plugin), colors)]
        blank = 0.0
        if k <= UNKNOWN and _accepts(plugin, torch.full((1, 1, 1), UNKNOWN)):
            unknown = np.unique(_vis(plugin, torch.full((1, 8, 8), UNKNOWN)).reshape(-1, 3), axis=0)
            colors = np.concatenate([colors, unknown])
            values += [UNKNOWN] * len(unknown)
            legend.append(("unknown", _hex(unknown.max(0))))
            blank = float(UNKNOWN)
        return CanvasSpec(name, plugin, "labels", np.array(values), colors, legend, blank)
    ramp = torch.linspace(0, 1, RAMP)
    # the drawn map is the raw one (a sketch with region hints feeds its encoder 3 channels, computed from 1)
    if getattr(plugin, "raw_channels", None) != 1 or not _accepts(plugin, ramp.reshape(1, 1, 1, RAMP)):
        return CanvasSpec(name, plugin, "upload", np.zeros(0), np.zeros((0, 3), np.uint8))
    colors = _vis(plugin, ramp.reshape(1, 1, 1, RAMP))[0, 0]
    example = plugin.example(2, 8, 8, torch.Generator().manual_seed(0))
    binary = bool(((example == 0) | (example == 1)).all())
    levels = [1.0, 0.0] if binary else [0.0, 0.25, 0.5, 0.75, 1.0]
    names = {1.0: "stroke", 0.0: "erase"} if binary else {}
    legend = [(names.get(v, f"{v:g}"), _hex(colors[round(v * (RAMP - 1))])) for v in levels]
    return CanvasSpec(name, plugin, "continuous", ramp.numpy(), colors, legend, BLANK_VALUES.get(name, 0.0), binary)


def _nearest(rgb: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Index of the nearest reference colour of every pixel, ``(h, w)``."""
    flat = torch.from_numpy(rgb.reshape(-1, 3).astype(np.float32))
    ref = torch.from_numpy(colors.astype(np.float32))
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)  # drawings have few distinct colours
    return torch.cdist(uniq, ref).argmin(1)[inverse].reshape(rgb.shape[:2]).numpy()


def _as_rgb(canvas: np.ndarray, blank_rgb: np.ndarray) -> np.ndarray:
    """RGB(A) / grey uint8 -> RGB, transparent pixels painted in the blank colour."""
    a = np.asarray(canvas)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8) if a.max(initial=0) > 1 else (np.clip(a, 0, 1) * 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255
        a = (a[..., :3] * alpha + blank_rgb[None, None] * (1 - alpha) + 0.5).astype(np.uint8)
    return a[..., :3]


def check_aspect(name: str, hw: tuple[int, int], size: tuple[int, int]) -> None:
    """Refuse a map whose aspect ratio differs from the output's (resizing it would distort the layout)."""
    h, w = hw
    if abs(h * size[1] - w * size[0]) > 0.02 * h * size[1]:
        raise AppError(f"modality '{name}': the map is {w}x{h} (width x height) but the output is "
                       f"{size[1]}x{size[0]}; crop it to that aspect ratio first")


def canvas_to_raw(spec: CanvasSpec, canvas: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A drawn canvas -> the modality's batched raw map ``(1, ...)`` at ``size`` (validated by the plugin)."""
    if spec.kind == "upload":
        raise AppError(f"modality '{spec.name}': cannot be drawn; upload a map file")
    canvas = np.asarray(canvas)
    check_aspect(spec.name, canvas.shape[:2], size)
    blank_idx = int(np.argmin(np.abs(spec.values.astype(np.float64) - spec.blank)))
    idx = torch.from_numpy(_nearest(_as_rgb(canvas, spec.colors[blank_idx]), spec.colors))
    H, W = size
    k = max(1, min(canvas.shape[0] // H, canvas.shape[1] // W))
    if tuple(idx.shape) != (H * k, W * k):  # a canvas that is not a whole multiple: nearest to the next one
        idx = F.interpolate(idx[None, None].float(), size=(H * k, W * k), mode="nearest-exact")[0, 0].long()
    values = torch.from_numpy(spec.values)
    if spec.kind == "labels":
        # majority vote per output pixel over the values (not the colours: two colours can mean "unknown")
        uniq, inv = torch.unique(values, return_inverse=True)
        blocks = inv[idx].reshape(H, k, W, k).permute(0, 2, 1, 3).reshape(H, W, k * k)
        votes = F.one_hot(blocks, len(uniq)).sum(2)
        labels = uniq[votes.argmax(-1)].long()
        return spec.plugin.to_tensor(labels)
    x = values[idx].float()[None, None]
    x = F.avg_pool2d(x, k) if k > 1 else x
    if spec.binary:
        x = (x >= 0.5).float()
    return spec.plugin.to_tensor(x.clamp(0, 1))


def raw_to_canvas(spec: CanvasSpec, raw: torch.Tensor, scale: int) -> np.ndarray:
    """A batched raw map ``(1, ...)`` -> the canvas image ``(H*scale, W*scale, 3)`` uint8 (``visualize`` colours)."""
    rgb = _vis(spec.plugin, raw[:1])[0]
    return np.repeat(np.repeat(rgb, scale, 0), scale, 1)


def blank_canvas(spec: CanvasSpec, size: tuple[int, int], scale: int) -> np.ndarray:
    """An empty canvas: every pixel the colour of the blank value."""
    i = int(np.argmin(np.abs(spec.values.astype(np.float64) - spec.blank))) if len(spec.values) else 0
    rgb = spec.colors[i] if len(spec.colors) else np.array([255, 255, 255], np.uint8)
    return np.broadcast_to(rgb, (size[0] * scale, size[1] * scale, 3)).copy()


def is_blank(spec: CanvasSpec, canvas: np.ndarray | None) -> bool:
    """Is nothing drawn: every opaque pixel within a few levels of the blank colour (transparent = blank)?"""
    if canvas is None:
        return True
    a = np.asarray(canvas)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    ref = blank_canvas(spec, (1, 1), 1)[0, 0].astype(np.int16)
    opaque = a[..., 3] > 0 if a.shape[-1] == 4 else np.ones(a.shape[:2], bool)
    differs = (np.abs(a[..., :3].astype(np.int16) - ref) > 8).any(-1)
    return not (opaque & differs).any()


def read_map_file(spec: CanvasSpec, path: str | Path, size: tuple[int, int]) -> tuple[torch.Tensor, str | None]:
    """An uploaded map file -> ``(batched raw map at size, note or None)``.

    Read as the shards store it (the plugin's own ``decode`` of its shard key: class ids, 8/16-bit
    grey depth, dark-on-white sketches), else, for a colour image, as a canvas in the plugin's colours.
    A map of another size is resized (nearest for labels) and the note says so; another aspect ratio is refused.
    """
    from PIL import Image

    name, plugin = spec.name, spec.plugin
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            colour = mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F", "LA") and \
                not _is_grey(np.asarray(im.convert("RGB")))
            rgba = np.asarray(im.convert("RGBA")) if colour else None
    except Exception as e:
        raise AppError(f"modality '{name}': '{Path(path).name}' is not a readable image ({type(e).__name__}: {e})")
    check_aspect(name, (h, w), size)
    raw = None
    if not colour and plugin.shard_keys:
        raw = plugin.to_tensor(plugin.decode({plugin.shard_keys[0]: data}))
    elif colour and spec.kind != "upload":
        raw = canvas_to_raw(spec, rgba, (h, w))
    if raw is None:
        with Image.open(io.BytesIO(data)) as im:
            raw = plugin.to_tensor(im)
    note = None
    if tuple(raw.shape[-2:]) != tuple(size):
        note = f"modality '{name}': the {w}x{h} map was resized to {size[1]}x{size[0]} (the output size)"
        raw = plugin.resize(raw, size)
    return raw, note


def _is_grey(rgb: np.ndarray) -> bool:
    return bool((rgb == rgb[..., :1]).all())


def region_mask(canvas: np.ndarray | None, size: tuple[int, int]) -> torch.Tensor | None:
    """The region brush -> ``(H, W)`` float map: 1 where painted (opaque, not black), else 0; ``None`` if unpainted."""
    if canvas is None:
        return None
    a = np.asarray(canvas)
    if a.ndim == 2:
        a = a[..., None]
    alpha = a[..., 3] > 127 if a.shape[-1] == 4 else np.ones(a.shape[:2], bool)
    painted = alpha & (a[..., :3].max(-1) > 127)
    if not painted.any():
        return None
    check_aspect("region", a.shape[:2], size)
    m = torch.from_numpy(painted.astype(np.float32))[None, None]
    return (F.interpolate(m, size=size, mode="area")[0, 0] >= 0.5).float()


# ---- 2. held-out examples -----------------------------------------------------------------------------
class HeldOut:
    """Held-out conditions: the shards' first samples (``data``), or the shapes generator's ``test`` split."""

    def __init__(self, plugins: Mapping[str, Any], size: tuple[int, int], data: str | None = None, limit: int = 64):
        self.plugins, self.size, self.data, self.limit = dict(plugins), size, data, limit
        self._cache: dict | None = None
        self._lock = threading.Lock()

    def _shards(self) -> dict:
        with self._lock:
            if self._cache is None:
                from mcm.evaluation.evaluate import load_data

                specs = {n: p.config() for n, p in self.plugins.items()}
                self._cache = load_data(self.data, specs, self.size[0], self.limit)
            return self._cache

    def __call__(self, index: int) -> tuple[dict[str, torch.Tensor], str, torch.Tensor]:
        """Example ``index``: ``({modality: batched raw (1, ...)}, caption, image (1, 3, H, W) in [0, 1])``."""
        if self.data:
            d = self._shards()
            i = index % d["image"].shape[0]
            return {n: d[n][i:i + 1] for n in self.plugins}, d["caption"][i], d["image"][i:i + 1]
        from datamodules.sample_decoding import decode_image, decode_modality
        from datamodules.shapes import make_sample, sample_to_wds

        if self.size[0] != self.size[1]:
            raise AppError(f"held-out examples: the shapes generator makes square images, the output is {self.size}")
        key = f"test_{index:08d}"
        sample = sample_to_wds(make_sample(EXAMPLE_SEED, index, self.size[0], split="test"), key)
        image = decode_image(sample)
        maps = {}
        for n, p in self.plugins.items():
            raw = decode_modality(p, sample, image)
            maps[n] = p.to_tensor(p.eval_transform(raw, key))
        return maps, sample["txt"], image[None].float() / 255
