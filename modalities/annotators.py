"""Annotators from local ``transformers`` models: segmenters and monocular depth models (docs/judges.md).

They derive the maps a dataset lacks (``mcm data pack --derive``, ``Segmentation.derive`` /
``Depth.derive`` with ``annotator=``) and judge samples (``mcm evaluate --segmenter / --depth-model``,
via ``mcm.evaluation.judges.local_models``).  A model is a *local* directory written by
``save_pretrained`` of the model and of its image processor: ``config.json``, ``model.safetensors``
(or a sharded ``model.safetensors.index.json``) and ``preprocessor_config.json``.  Loading is always
``local_files_only=True`` with safetensors only; nothing is fetched and nothing is unpickled.

Supported:

* segmenters: any ``AutoModelForSemanticSegmentation`` whose output has per-pixel ``logits``
  ``(B, K, h, w)``: SegFormer, UperNet, DPT, BEiT, MobileViT, ...  Mask2Former / MaskFormer /
  OneFormer (``AutoModelForUniversalSegmentation``: query masks, not per-pixel logits) are refused
  with an error saying so.  Logits are upsampled bilinearly (``align_corners=False``) to the image,
  as ``post_process_semantic_segmentation`` does; ids are their argmax, probabilities their softmax.
* depth models: any ``AutoModelForDepthEstimation`` (``predicted_depth``): DPT, Depth Anything,
  GLPN, ZoeDepth, Depth Pro, ...

Depth convention (the ``depth`` modality: float in [0, 1], 0 = nearest; ``depth.png`` stores
``round(65535 * d)``).  With ``r`` the model's raw output resized bilinearly to the image and,
per image, ``n = (r - min r) / (max r - min r)`` (0 where the image is constant):

* ``kind="inverse"`` (relative inverse depth / disparity, larger = nearer: DPT, MiDaS, Depth Anything
  ``relative``): ``d = 1 - n``;
* ``kind="metric"`` (depth, larger = farther: ZoeDepth, GLPN, Depth Pro, Depth Anything ``metric``):
  ``d = n``;
* ``kind="auto"`` picks ``metric`` for those model types and ``inverse`` for every other one.

So 0 is the nearest pixel of each image and 1 its farthest.  Relative inverse depth is only known up
to scale and shift, so ``d`` is monotone in true depth but not linear in it.

Label mapping (:class:`LabelMap`): JSON or YAML, either flat ``{"person": 1, "car": 2, "sky": "ignore"}``
or ``{"classes": {...}, "num_classes": 3, "unmapped": 0, "class_names": [...]}``.  Keys are the
segmenter's ``id2label`` names or its integer ids; values are the module's class ids (``0 ..
num_classes - 1``) or ``"ignore"`` (id :data:`IGNORE` = 255, the ``partial_mask`` "unknown" label).
Segmenter classes not named go to ``unmapped`` (default 0, background).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.nn import functional as F

#: id of pixels whose segmenter class is mapped to ``"ignore"`` (the ``partial_mask`` unknown label)
IGNORE = 255
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DEPTH_KINDS = ("auto", "inverse", "metric")
#: model types whose ``predicted_depth`` is depth (larger = farther), not inverse depth
METRIC_DEPTH_MODEL_TYPES = ("zoedepth", "glpn", "depth_pro", "prompt_depth_anything")
UNIVERSAL_SEGMENTERS = ("mask2former", "maskformer", "oneformer")
EXPECTED_DIR = ("a local transformers model directory written by save_pretrained of the model and its image "
                "processor: config.json, model.safetensors (or model.safetensors.index.json) and "
                "preprocessor_config.json; nothing is downloaded")


class AnnotatorError(ValueError):
    """A model directory or label map that cannot be used; the message names the file and what is expected."""


# ---- loading ---------------------------------------------------------------------------------------------
def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AnnotatorError(f"{what} {str(p)!r}: not a directory; expected {EXPECTED_DIR}")
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (p / f).is_file()]
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt*")]
        hint = (f" ({', '.join(pickled)} found: pickled weights are never loaded; convert them to safetensors)"
                if pickled and not any((p / f).is_file() for f in WEIGHT_FILES) else "")
        raise AnnotatorError(f"{what} {str(p)!r}: missing {', '.join(missing)}{hint}; expected {EXPECTED_DIR}")
    return p


def _load(path: str | Path, auto_class: str, what: str, device: str | torch.device):
    """``(config, model, processor)`` of a local directory, through the ``transformers`` auto class."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    p = _check_dir(path, what)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    if config.model_type in UNIVERSAL_SEGMENTERS:
        raise AnnotatorError(f"{what} {str(p)!r}: model type '{config.model_type}' is a universal (query-mask) "
                             "segmenter; only AutoModelForSemanticSegmentation models with per-pixel logits are "
                             "supported (SegFormer, UperNet, DPT, BEiT, MobileViT, ...)")
    head = auto_class.removeprefix("AutoModel")  # "ForSemanticSegmentation" / "ForDepthEstimation"
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(head) for a in archs):  # e.g. a DPT depth model named as a segmenter
        raise AnnotatorError(f"{what} {str(p)!r}: its config.json says architectures {archs}; expected a "
                             f"*{head} model ({auto_class})")
    try:
        model, info = getattr(transformers, auto_class).from_pretrained(
            p, local_files_only=True, use_safetensors=True, output_loading_info=True)
    except (ValueError, RuntimeError, OSError) as e:  # unknown config class, shape mismatch, unreadable file
        raise AnnotatorError(f"{what} {str(p)!r}: model type '{config.model_type}' cannot be loaded as "
                             f"{auto_class}: the weights do not fit ({type(e).__name__}: {e})") from None
    # a key left at its random init would judge (or annotate) with noise: every weight must come from the file
    bad = {k: sorted(map(str, info.get(k) or []))[:5] for k in ("missing_keys", "mismatched_keys")}
    if any(bad.values()):
        raise AnnotatorError(f"{what} {str(p)!r}: the weights do not fit {type(model).__name__} "
                             f"({', '.join(f'{k}: {v}' for k, v in bad.items() if v)}); expected a complete "
                             f"{auto_class} checkpoint")
    processor = AutoImageProcessor.from_pretrained(p, local_files_only=True)
    if getattr(processor, "do_center_crop", False):  # the prediction would no longer cover the image
        raise AnnotatorError(f"{what} {str(p)!r}: its image processor center-crops (do_center_crop=true); "
                             "set it to false in preprocessor_config.json so predictions cover the whole image")
    return config, model.eval().to(device), processor


class _LocalModel:
    """Shared preprocessing: RGB ``(B, 3, H, W)`` in [0, 1] -> the processor's ``pixel_values``, in chunks."""

    def __init__(self, model, processor, source: Path, batch_size: int = 16):
        self.model, self.processor, self.source, self.batch_size = model, processor, Path(source), batch_size
        self.name = str(self.source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        images = images.float() / 255.0 if not images.is_floating_point() else images.float()
        # already in [0, 1]: the processor must not rescale by 1/255 again
        pv = self.processor(images=list(images.cpu().clamp(0, 1)), return_tensors="pt", do_rescale=False)
        return pv["pixel_values"].to(self.device, self.model.dtype)

    def _chunks(self, images: torch.Tensor):
        for i in range(0, images.shape[0], self.batch_size):
            yield images[i:i + self.batch_size]


# ---- segmentation ----------------------------------------------------------------------------------------
class Segmenter(_LocalModel):
    """A local semantic segmenter; ids and probabilities are in the module's classes when a label map is set.

    ``num_labels``: the segmenter's own classes; ``num_classes``: the output's (the label map's, else
    ``num_labels``).  ``segment`` / ``predict`` give ids ``(B, H, W)`` int64, ``probabilities`` ``(B, K, H, W)``.
    """

    task = "segmentation"

    def __init__(self, model, processor, source: Path, label_map: LabelMap | None = None, batch_size: int = 16):
        super().__init__(model, processor, source, batch_size)
        self.num_labels = int(model.config.num_labels)
        self.id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        self.label_map = label_map
        self.num_classes = label_map.num_classes if label_map is not None else self.num_labels

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The segmenter's own logits ``(B, num_labels, H, W)``, upsampled to the images' size."""
        size = tuple(images.shape[-2:])
        out = [F.interpolate(self.model(pixel_values=self._pixel_values(x)).logits.float(), size=size,
                             mode="bilinear", align_corners=False).cpu() for x in self._chunks(images)]
        return torch.cat(out)

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Ids ``(B, H, W)`` int64: the label map applied to the argmax of the upsampled logits."""
        ids = self.logits(images).argmax(1)
        return self.label_map.lut[ids] if self.label_map is not None else ids

    predict = segment  # the judge protocol (mcm.evaluation.judges.Judge)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, num_classes, H, W)``, summing to 1 per pixel.

        Softmax of the upsampled logits; with a label map each module class gets the summed
        probability of the segmenter classes mapped to it, ignored classes' mass is dropped and
        the rest renormalised.  (Their argmax can differ from ``segment``, which maps the argmax.)
        """
        probs = self.logits(images).softmax(1)  # (B, num_labels, H, W)
        if self.label_map is None:
            return probs
        probs = torch.einsum("bshw,sk->bkhw", probs, self.label_map.assignment())
        return probs / probs.sum(1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Spatially averaged last hidden state ``(B, D)``: a feature space for FID / KID."""
        out = []
        for x in self._chunks(images):
            hidden = self.model(pixel_values=self._pixel_values(x), output_hidden_states=True).hidden_states
            if not hidden:
                raise AnnotatorError(f"segmenter {self.name}: the model returns no hidden states for features(); "
                                     "choose another feature judge")
            h = hidden[-1].float()
            out.append((h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1)).cpu())  # (B, C, h, w) or (B, N, C)
        return torch.cat(out)


def load_segmenter(path: str | Path, label_map: str | Path | Mapping | None = None, num_classes: int | None = None,
                   device: str | torch.device = "cpu", batch_size: int = 16) -> Segmenter:
    """A :class:`Segmenter` from a local directory; ``label_map`` (file or dict) maps its classes to the module's.

    ``num_classes`` is the module's K: checked against the label map (or, without one, against the
    segmenter's own number of labels).
    """
    _, model, processor = _load(path, "AutoModelForSemanticSegmentation", "segmenter", device)
    seg = Segmenter(model, processor, Path(path), batch_size=batch_size)
    if label_map is not None:
        seg.label_map = LabelMap.from_spec(label_map, seg.id2label or {i: str(i) for i in range(seg.num_labels)},
                                           num_classes, source=str(path))
        seg.num_classes = seg.label_map.num_classes
    elif num_classes is not None and num_classes != seg.num_labels:
        raise AnnotatorError(f"segmenter {str(path)!r} has {seg.num_labels} labels but the module's segmentation has "
                             f"num_classes={num_classes}; give a label map from the segmenter's labels to the module's")
    return seg


# ---- label mapping ---------------------------------------------------------------------------------------
def _read_mapping(spec: str | Path | Mapping) -> tuple[dict, str]:
    if isinstance(spec, Mapping):
        return dict(spec), "label map"
    p = Path(spec)
    if not p.is_file():
        raise AnnotatorError(f"label map {str(p)!r}: no such file (expected JSON or YAML)")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise AnnotatorError(f"label map {str(p)!r}: not valid {p.suffix.lstrip('.') or 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise AnnotatorError(f"label map {str(p)!r}: expected a mapping, got {type(data).__name__}")
    return data, f"label map {str(p)!r}"


@dataclass(frozen=True)
class LabelMap:
    """Segmenter class id -> module class id (or :data:`IGNORE`), as a lookup table ``lut`` ``(num_labels,)``."""

    lut: torch.Tensor
    num_classes: int
    source: str = "label map"

    @property
    def ignored(self) -> list[int]:
        """Segmenter ids mapped to ``"ignore"``."""
        return (self.lut == IGNORE).nonzero().flatten().tolist()

    def assignment(self) -> torch.Tensor:
        """``(num_labels, num_classes)`` 0/1 matrix: row ``s`` is one-hot of ``lut[s]`` (zero when ignored)."""
        a = torch.zeros(len(self.lut), self.num_classes)
        keep = self.lut != IGNORE
        a[keep.nonzero().flatten(), self.lut[keep]] = 1.0
        return a

    @classmethod
    def from_spec(cls, spec: str | Path | Mapping, id2label: Mapping[int, str], num_classes: int | None = None,
                  source: str = "") -> LabelMap:
        """Parse and check a mapping against the segmenter's ``id2label`` and the module's ``num_classes``."""
        data, where = _read_mapping(spec)
        classes = data.get("classes", data) if isinstance(data.get("classes"), Mapping) else data
        structured = classes is not data
        if structured and (extra := sorted(set(data) - {"classes", "num_classes", "unmapped", "class_names"})):
            raise AnnotatorError(f"{where}: unknown keys {extra}; expected classes, num_classes, unmapped, class_names")
        names = {int(i): str(n) for i, n in id2label.items()}
        seg_labels = ", ".join(f"{i}={n}" for i, n in sorted(names.items())[:40]) + (" ..." if len(names) > 40 else "")
        module_names = data.get("class_names") if structured else None
        k_file = data.get("num_classes") if structured else None
        if k_file is not None and num_classes is not None and int(k_file) != num_classes:
            raise AnnotatorError(f"{where}: num_classes={k_file} but the module's segmentation has "
                                 f"num_classes={num_classes}")
        unmapped = data.get("unmapped", 0) if structured else 0
        resolved: dict[int, int] = {}
        pairs: list[tuple[Any, int]] = []  # (key as written, module id), for messages
        for key, value in classes.items():
            sid = cls._segmenter_id(key, names, where, seg_labels)
            mid = cls._module_id(value, f"{where}: {key!r}")
            if sid in resolved and resolved[sid] != mid:
                raise AnnotatorError(f"{where}: segmenter class {sid} ({names.get(sid)}) is mapped twice, "
                                     f"to {resolved[sid]} and {mid}")
            resolved[sid] = mid
            pairs.append((key, mid))
        default = cls._module_id(unmapped, f"{where}: unmapped")
        used = [m for m in [*resolved.values(), default] if m != IGNORE]
        k = int(k_file if k_file is not None else num_classes if num_classes is not None else max(used, default=0) + 1)
        too_big = {key: v for key, v in pairs if v != IGNORE and v >= k}
        if default != IGNORE and default >= k:
            too_big["unmapped"] = default
        if too_big:
            module = f"ids 0..{k - 1}" + (f" ({', '.join(map(str, module_names))})" if module_names else "")
            raise AnnotatorError(f"{where}: {too_big} map to module class ids >= num_classes={k}; the module's "
                                 f"classes are {module}, the segmenter's labels are {seg_labels}")
        lut = torch.full((max(names, default=-1) + 1,), default, dtype=torch.long)
        for sid, mid in resolved.items():
            lut[sid] = mid
        return cls(lut, k, source or where)

    @staticmethod
    def _segmenter_id(key: Any, names: dict[int, str], where: str, seg_labels: str) -> int:
        if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
            sid = int(key)
            if sid in names:
                return sid
            raise AnnotatorError(f"{where}: segmenter class id {sid} does not exist; the segmenter's labels are "
                                 f"{seg_labels}")
        by_name = {n: i for i, n in names.items()}
        if str(key) in by_name:
            return by_name[str(key)]
        folded = [i for n, i in by_name.items() if n.lower() == str(key).lower()]
        if len(folded) == 1:
            return folded[0]
        close = difflib.get_close_matches(str(key), list(by_name), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AnnotatorError(f"{where}: {key!r} is not a label of the segmenter; its labels are {seg_labels}.{hint}")

    @staticmethod
    def _module_id(value: Any, where: str) -> int:
        if isinstance(value, str) and value.strip().lower() == "ignore":
            return IGNORE
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AnnotatorError(f"{where}: expected a module class id (integer >= 0) or \"ignore\", got {value!r}")
        return value


# ---- depth -----------------------------------------------------------------------------------------------
def to_depth_convention(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """Raw model output ``(B, 1, H, W)`` -> depth in [0, 1], 0 = nearest (formula in the module docstring)."""
    if kind not in ("inverse", "metric"):
        raise ValueError(f"kind: expected 'inverse' or 'metric', got {kind!r}")
    r = raw.double()
    lo, hi = r.amin(dim=(1, 2, 3), keepdim=True), r.amax(dim=(1, 2, 3), keepdim=True)
    n = torch.where(hi > lo, (r - lo) / (hi - lo).clamp(min=1e-300), torch.zeros_like(r))
    return (1 - n if kind == "inverse" else n).float()


def depth_kind_of(config: Any, kind: str = "auto") -> str:
    """``inverse`` or ``metric`` for a model config; ``kind`` other than ``auto`` is returned as is."""
    if kind not in DEPTH_KINDS:
        raise AnnotatorError(f"depth kind: expected one of {DEPTH_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    metric = (config.model_type in METRIC_DEPTH_MODEL_TYPES
              or getattr(config, "depth_estimation_type", "relative") == "metric")
    return "metric" if metric else "inverse"


class DepthEstimator(_LocalModel):
    """A local monocular depth model; ``depth`` / ``predict`` give ``(B, 1, H, W)`` in [0, 1], 0 = nearest."""

    task = "depth"

    def __init__(self, model, processor, source: Path, kind: str, batch_size: int = 16):
        super().__init__(model, processor, source, batch_size)
        self.kind = kind

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """The model's ``predicted_depth`` ``(B, 1, H, W)``, resized bilinearly to the images' size, unconverted."""
        size = tuple(images.shape[-2:])
        out = []
        for x in self._chunks(images):
            d = self.model(pixel_values=self._pixel_values(x)).predicted_depth.float()
            d = d[:, None] if d.ndim == 3 else d  # (B, h, w) -> (B, 1, h, w)
            out.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def depth(self, images: torch.Tensor) -> torch.Tensor:
        return to_depth_convention(self.raw(images), self.kind)

    predict = depth  # the judge protocol (mcm.evaluation.judges.Judge)


def load_depth_model(path: str | Path, kind: str = "auto", device: str | torch.device = "cpu",
                     batch_size: int = 16) -> DepthEstimator:
    """A :class:`DepthEstimator` from a local directory; ``kind`` says how its output is read (module docstring)."""
    if kind not in DEPTH_KINDS:
        raise AnnotatorError(f"depth kind: expected one of {DEPTH_KINDS}, got {kind!r}")
    config, model, processor = _load(path, "AutoModelForDepthEstimation", "depth model", device)
    return DepthEstimator(model, processor, Path(path), depth_kind_of(config, kind), batch_size)
