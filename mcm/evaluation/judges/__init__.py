"""Judges: networks that read generated images back into a modality, so alignment can be measured.

A segmentation judge maps RGB ``(B, 3, H, W)`` in [0, 1] to labels ``(B, H, W)``; a depth
judge to ``(B, 1, H, W)`` (0 = nearest, any affine scale: depth metrics align it).  A judge
may also offer ``features(images) -> (B, D)``, the feature space of ``fid_judge``/``kid_judge``.

Three verbs, timm style::

    from mcm.evaluation.judges import list_judges, load_judge
    list_judges()                                   # ['shapes32-depth', 'shapes32-segmentation']
    seg = load_judge("shapes32-segmentation")       # shipped, trained on `shapes` (see ACCURACY.md)
    seg = load_judge("path/to/judge_dir")           # config.json + safetensors (see below)
    seg = load_judge("my_pkg.judges:CitySeg", task="segmentation", num_classes=19, ckpt="w.pt")

What ``load_judge(spec)`` accepts:

* a built-in name from :func:`list_judges`;
* a directory (or its ``config.json``) written by ``JudgeUNet.save_pretrained``;
* a local ``transformers`` segmenter or depth model directory (``save_pretrained`` of the model and its
  image processor; see ``modalities.annotators``); with a label map use
  :func:`~mcm.evaluation.judges.local_models.build_judges` (``Judges``, the judges of one evaluation);
* a directory or JSON file ``{"class_path": "mcm.evaluation.judges.networks:JudgeUNet", "init_args": {...},
  "weights": "model.safetensors", "task": "segmentation", "num_classes": 19}``: a network from
  :data:`JUDGE_CLASSES` (the shipped judge networks) built from its config, weights loaded from safetensors
  (strict).  A file names a class; a file may come from anywhere, so any class outside that allow-list is
  refused before anything is imported (``subprocess:call`` with ``args`` would otherwise run a program);
* an import path ``"pkg.mod:attr"`` given by the caller (Python or a command line, not a downloaded file): a
  class (instantiated with the keyword arguments), or any callable / module instance, called as ``attr(images)``;
* a Python object (an ``nn.Module`` or callable) passed directly.
"""
from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mcm.models.frozen_base import WEIGHTS_DIR
from .networks import TASKS, JudgeUNet

JUDGES_DIR = WEIGHTS_DIR / "shapes32" / "judges"
#: the classes a judge directory's ``config.json`` may name (``class_path``); transformers models load through
#: their Auto classes from ``model_type`` configs (``local_models``), never through a named class
JUDGE_CLASSES = ("mcm.evaluation.judges.networks:JudgeUNet",)
BUILTIN_JUDGES = {f"shapes32-{task}": JUDGES_DIR / task for task in TASKS}

__all__ = ["Judge", "JudgeUNet", "Judges", "build_judges", "load_judge", "list_judges", "BUILTIN_JUDGES",
           "JUDGES_DIR", "JUDGE_CLASSES"]


def list_judges(filter: str = "") -> list[str]:  # noqa: A002 - timm's name for it
    """Built-in judge names containing ``filter``, sorted."""
    return sorted(n for n in BUILTIN_JUDGES if filter in n)


class Judge:
    """Uniform wrapper: ``predict(images)`` gives labels ``(B, H, W)`` or depth ``(B, 1, H, W)`` at the input size.

    Args:
        model: an ``nn.Module`` or callable mapping images ``(B, 3, H, W)`` in [0, 1] to a
            prediction: logits ``(B, K, h, w)`` or labels ``(B, h, w)`` for segmentation,
            ``(B, 1, h, w)`` or ``(B, h, w)`` for depth.  A ``predict`` method is used if present.
        task: ``"segmentation"`` or ``"depth"``.
        num_classes: classes of a segmentation judge (``None``: unknown, not checked).
        name: where it came from, for reports.
    """

    def __init__(self, model: Any, task: str, num_classes: int | None = None, name: str = ""):
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        self.model, self.task, self.num_classes, self.name = model, task, num_classes, name or type(model).__name__
        if isinstance(model, nn.Module):
            model.eval()

    @property
    def has_features(self) -> bool:
        return callable(getattr(self.model, "features", None))

    @property
    def num_features(self) -> int | None:
        return getattr(self.model, "num_features", None)

    def to(self, device: str | torch.device) -> "Judge":
        if isinstance(self.model, nn.Module):
            self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        if isinstance(self.model, nn.Module):
            p = next(self.model.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        fn: Callable = getattr(self.model, "predict", None) or self.model
        size = tuple(images.shape[-2:])
        out = fn(images.to(self.device)).cpu()
        if self.task == "segmentation":
            if out.is_floating_point() and out.ndim == 4:  # logits
                out = F.interpolate(out.float(), size=size, mode="bilinear") if tuple(out.shape[-2:]) != size else out
                return out.argmax(1)
            if out.ndim != 3:
                raise ValueError(f"judge {self.name}: segmentation output must be (B, K, H, W) logits or (B, H, W) "
                                 f"labels, got shape {tuple(out.shape)}")
            out = out.long()
            return F.interpolate(out[:, None].float(), size=size, mode="nearest")[:, 0].long() \
                if tuple(out.shape[-2:]) != size else out
        out = out[:, None] if out.ndim == 3 else out
        if out.ndim != 4 or out.shape[1] != 1:
            raise ValueError(f"judge {self.name}: depth output must be (B, 1, H, W), got shape {tuple(out.shape)}")
        out = out.float()
        return F.interpolate(out, size=size, mode="bilinear") if tuple(out.shape[-2:]) != size else out

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_features:
            raise ValueError(f"judge {self.name} has no features(images) method; FID/KID need one")
        return self.model.features(images.to(self.device)).float().cpu()


def _import(path: str) -> Any:
    mod, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"judge: {path!r} is not an import path like 'pkg.module:attr'")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def allowed_judge_class(class_path: Any, config_file: Path) -> str:
    """``class_path`` if it names a class of :data:`JUDGE_CLASSES` (``pkg.mod:Class`` or ``pkg.mod.Class``);
    otherwise a ``ValueError`` naming it and the allowed ones, raised before anything is imported."""
    name = class_path.replace(":", ".") if isinstance(class_path, str) else None
    if name not in {c.replace(":", ".") for c in JUDGE_CLASSES}:
        raise ValueError(f"judge config {config_file}: class_path {class_path!r} is not an allowed judge class; "
                         f"expected one of {list(JUDGE_CLASSES)}, or a transformers model directory (its "
                         f"config.json with model_type). A judge of your own: pass it to load_judge as an object "
                         f"or an import path, not through a file")
    return class_path


def _from_config(config_file: Path, **kwargs) -> Judge:
    cfg = json.loads(config_file.read_text())
    if "class_path" not in cfg and "model_type" in cfg:  # a transformers save_pretrained directory
        from .local_models import local_judge

        archs = " ".join(cfg.get("architectures") or [])
        task = kwargs.get("task") or ("depth" if "DepthEstimation" in archs else
                                      "segmentation" if "Segmentation" in archs else None)
        if task is None:
            raise ValueError(f"judge {config_file.parent}: a transformers model ({archs or cfg['model_type']}) whose "
                             f"task cannot be told from its architectures; pass task= one of {TASKS}")
        return local_judge(config_file.parent, task, num_classes=kwargs.get("num_classes"))
    if "class_path" not in cfg:  # a JudgeUNet.save_pretrained directory
        model = JudgeUNet.from_pretrained(config_file.parent, use_safetensors=True)
        c = model.config
        return Judge(model, c.task, c.num_classes if c.task == "segmentation" else None, str(config_file.parent))
    from safetensors.torch import load_file

    model = _import(allowed_judge_class(cfg["class_path"], config_file))(**cfg.get("init_args", {}))
    weights = config_file.parent / cfg.get("weights", "model.safetensors")
    if weights.is_file():
        model.load_state_dict(load_file(weights), strict=True)
    elif "weights" in cfg:
        raise FileNotFoundError(f"judge config {config_file}: weights file '{weights}' does not exist")
    task = kwargs.get("task") or cfg.get("task")
    if task is None:
        raise ValueError(f"judge config {config_file}: say which task it judges with \"task\": one of {TASKS}")
    return Judge(model, task, kwargs.get("num_classes") or cfg.get("num_classes"), str(config_file))


def load_judge(spec: str | Path | Any, task: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu", **kwargs: Any) -> Judge:
    """Build a :class:`Judge` from a built-in name, a directory / config path, an import path or an object.

    Args:
        spec: see the module docstring.
        task: ``"segmentation"`` or ``"depth"``; read from the judge when it says (``JudgeUNet``,
            a ``task`` attribute, a config's ``"task"``).
        num_classes: classes of a segmentation judge, when the judge cannot say.
        kwargs: passed to a class named by an import path.
    """
    if isinstance(spec, Judge):
        return spec.to(device)
    if not isinstance(spec, (str, Path)):  # a module or callable passed in directly
        judge = Judge(spec, task or getattr(spec, "task", None) or _task_missing(spec), num_classes)
        return judge.to(device)
    name = str(spec)
    path = Path(BUILTIN_JUDGES.get(name, name))
    if name in BUILTIN_JUDGES and not (path / "config.json").is_file():
        raise FileNotFoundError(f"built-in judge '{name}' has no weights at {path}; train them with "
                                f"`python -m mcm.evaluation.judges.train --out {JUDGES_DIR}`")
    if path.is_dir() or path.suffix == ".json":
        config = path / "config.json" if path.is_dir() else path
        if not config.is_file():
            raise FileNotFoundError(f"judge: '{path}' has no config.json")
        judge = _from_config(config, task=task, num_classes=num_classes)
    elif ":" in name or ("." in name and not path.suffix):
        obj = _import(name)
        if isinstance(obj, type):
            obj = obj(**kwargs)
        judge = Judge(obj, task or getattr(obj, "task", None) or _task_missing(name),
                      num_classes or getattr(obj, "num_classes", None), name)
    else:
        close = difflib.get_close_matches(name, list(BUILTIN_JUDGES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown judge '{name}': not a built-in ({list_judges()}), an existing directory or "
                         f"config.json, nor an import path 'pkg.module:attr'.{hint}")
    if task is not None and judge.task != task:
        raise ValueError(f"judge '{name}' judges {judge.task}, but {task} was asked for")
    return judge.to(device)


def _task_missing(what: Any) -> str:
    raise ValueError(f"judge {what!r}: pass task= one of {TASKS} (the judge does not say which task it judges)")


from .local_models import Judges, build_judges  # noqa: E402 - it builds on the names above
