"""``mcm app`` without Gradio, part 2: the pipeline, one generation, the judges' scores, the Python call, the files.

Plain values in and out (``tests/test_app.py`` checks them without a browser); part 1, the maps:
:mod:`mcm.cli.app_maps`.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mcm.cli.app_maps import MODALITY_ORDER, AppError
from modalities.masks import foreground_iou

log = logging.getLogger(__name__)

#: scheduler choices of the page: label -> diffusers class name (all run with the shipped v-prediction base)
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPM-Solver++ (2M)": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "DEIS": "DEISMultistepScheduler",
    "PNDM": "PNDMScheduler",
    "DDPM": "DDPMScheduler",
}


# ---- 1. sampling ----------------------------------------------------------------------------------------
@dataclass
class Request:
    """One press of "Generate": which modules and maps, and the sampler settings."""

    maps: dict[str, torch.Tensor]  # modality -> batched raw (1, ...) at the output size (only the ticked ones)
    modules: list[int]  # indices of the loaded modules to use
    strengths: list[float]  # one per loaded module
    region: torch.Tensor | None = None  # (H, W) in {0, 1}: the modules act only there (strength map)
    prompt: str = ""
    negative_prompt: str = ""
    num_images: int = 4
    steps: int = 25
    guidance_scale: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    scheduler: str = "DDIM"
    class_label: int | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


@dataclass
class Result:
    conditions: dict[str, torch.Tensor]  # modality -> visualisation (1, 3, H, W)
    base: torch.Tensor  # (B, 3, H, W) in [0, 1]
    mcm: torch.Tensor  # (B, 3, H, W) in [0, 1]
    scores: list[dict[str, Any]]  # one row per sample
    code: str
    arrays: dict[str, np.ndarray]  # what the code loads from conditions.npz
    seconds: float = 0.0
    base_reused: bool = False  # the base alone came from the cache (same sampler settings as an earlier run)


class Session:
    """The loaded pipeline and what the page needs from it; one generation at a time."""

    def __init__(self, models: Sequence[str], base: str | None = None, weights: Sequence[float] | None = None,
                 device: str = "cpu", data: str | None = None):
        self.models, self.weights_arg, self.device, self.data = list(models), list(weights or []) or None, device, data
        self.lock = threading.Lock()
        self.pipe = self.load(base)
        self.judges: dict[str, Any] | None = None
        self._base_cache: dict[tuple, torch.Tensor] = {}

    def load(self, base: str | None):
        """Build ``base`` + the modules (``None``: the modules' own base); refused as in the pipeline."""
        from mcm.evaluation.evaluate import build_pipeline

        pipe = build_pipeline(self.models, base, self.weights_arg, self.device)
        pipe.set_progress_bar_config(disable=True)
        self.base_name = str(pipe.base.source)
        self.default_scheduler = dict(pipe.scheduler.config)
        own = type(pipe.scheduler).__name__
        self.default_scheduler_label = next((k for k, v in SCHEDULERS.items() if v == own), "DDIM")
        return pipe

    def switch_base(self, base: str) -> str:
        """Load the same modules on another base (the page's "base" field); errors leave the current one."""
        with self.lock:
            pipe = self.load(base.strip() or None)
            self.pipe, self.judges, self._base_cache = pipe, None, {}
        return self.base_name

    # -- what the page shows
    @property
    def modules(self) -> list:
        return self.pipe.modules

    @property
    def module_names(self) -> list[str]:
        return [Path(str(m)).name if str(m) not in ("shapes32",) else "shapes32 (multimodal MCM)" for m in self.models]

    @property
    def size(self) -> tuple[int, int]:
        s = self.pipe.base.sample_size
        ds = self.pipe.base.downsample
        return (s[0] * ds, s[1] * ds)

    @property
    def plugins(self) -> dict[str, Any]:
        """Every modality of the loaded modules (the first module that has it gives its plugin), built-ins first."""
        out: dict[str, Any] = {}
        for m in self.modules:
            for n in m.modality_names:
                out.setdefault(n, m.plugins[n])
        order = {n: i for i, n in enumerate(MODALITY_ORDER)}
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))

    @property
    def is_text_conditional(self) -> bool:
        return bool(self.pipe.base.is_text_conditional)

    @property
    def is_class_conditional(self) -> bool:
        return bool(getattr(self.pipe.base, "is_class_conditional", False))

    @property
    def judged(self) -> bool:
        """Judges exist for the shapes32 base only (they were trained on its images)."""
        from mcm.models.base_loading import builtin_base_name

        return builtin_base_name(self.base_name) == "shapes32"

    def load_judges(self) -> dict[str, Any]:
        if self.judges is None:
            from mcm.evaluation.judges import load_judge

            self.judges = {t: load_judge(f"shapes32-{t}", task=t, device=self.device)
                           for t in ("segmentation", "depth")}
        return self.judges

    def warm_up(self) -> None:
        """Tiny samples (base alone, every module with example maps) and the judges, so the first click does not
        pay for lazy initialisation."""
        H, W = self.size
        g = torch.Generator().manual_seed(0)
        conds = [{n: m.plugins[n].example(1, H, W, g) for n in m.modality_names} for m in self.modules]
        with self.lock, torch.no_grad():
            self.pipe(conditions={}, num_images=1, num_inference_steps=2, seeds=[0], output_type="pt")
            if conds:
                self.pipe(conditions=conds if len(conds) > 1 else conds[0], num_inference_steps=2, seeds=[0],
                          output_type="pt")
        if self.judged:
            self.load_judges()

    # -- sampling
    def scheduler(self, label: str):
        import diffusers

        if label not in SCHEDULERS:
            raise AppError(f"scheduler: expected one of {list(SCHEDULERS)}, got {label!r}")
        return getattr(diffusers, SCHEDULERS[label]).from_config(self.default_scheduler)

    def generate(self, req: Request) -> Result:
        import time

        from mcm.pipelines.pipeline import MCMPipeline, window_arguments

        check_request(req, len(self.modules))
        t0 = time.time()
        n = req.num_images
        mods = [self.modules[i] for i in req.modules]
        per_module = [{k: v.expand(n, *v.shape[1:]).contiguous() for k, v in req.maps.items() if k in m.plugins}
                      for m in mods]
        unused = sorted(set(req.maps) - {k for c in per_module for k in c})
        if unused:
            raise AppError(f"modality {unused}: none of the modules in use was trained on it; untick it "
                           f"or use a module that knows it")
        if not any(per_module):
            raise AppError("conditions: tick at least one condition (and draw, upload or load its map)")
        strengths = [float(req.strengths[i]) for i in req.modules]
        strength_arg: Any = [s * req.region for s in strengths] if req.region is not None else strengths
        if len(mods) == 1:
            strength_arg = strength_arg[0]
        conds: Any = per_module if len(mods) > 1 else per_module[0]
        prompt = (req.prompt or None) if self.is_text_conditional else None
        negative = (req.negative_prompt or None) if self.is_text_conditional else None
        extra = {"class_labels": [req.class_label] * n} if req.class_label is not None else {}
        common = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=req.steps,
                      guidance_scale=req.guidance_scale, seeds=req.seeds, output_type="pt", **extra)
        with self.lock, torch.no_grad():
            sched = self.scheduler(req.scheduler)
            w_all = self.pipe.weights
            pipe = self.pipe
            if req.modules != list(range(len(self.modules))):
                pipe = MCMPipeline.from_base(self.pipe.base, mods, [w_all[i] for i in req.modules], scheduler=sched)
                pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = sched
            # the base alone depends on the sampler settings only: redrawing a map and pressing Generate reuses it
            key = (self.base_name, req.scheduler, repr(sorted(common.items())))
            base = self._base_cache.get(key)
            reused = base is not None
            if base is None:
                base = pipe(conditions={}, num_images=n, **common).images.float().cpu()
                self._base_cache = {key: base, **dict(list(self._base_cache.items())[:7])}
            mcm = pipe(conditions=conds, conditioning_scale=strength_arg, **window_arguments(req.window),
                       **common).images.float().cpu()
        vis = {k: self.plugins[k].visualize(v).float().cpu() for k, v in req.maps.items()}
        scores = self.score(base, mcm, req) if self.judged else []
        arrays = {f"{k}": v.expand(n, *v.shape[1:]).numpy() for k, v in req.maps.items()}
        if req.region is not None:
            arrays["region"] = req.region.numpy()
        code = python_call(self, req)
        return Result(vis, base, mcm, scores, code, arrays, time.time() - t0, reused)

    def score(self, base: torch.Tensor, mcm: torch.Tensor, req: Request) -> list[dict[str, Any]]:
        judges = self.load_judges()
        return score_samples({"base": base, "MCM": mcm}, req.maps, self.plugins, judges, req.seeds)


def check_request(req: Request, n_modules: int) -> None:
    """Refuse settings the pipeline would refuse, with the page's words."""
    if not req.modules:
        raise AppError("modules: tick at least one module")
    if any(i < 0 or i >= n_modules for i in req.modules):
        raise AppError(f"modules: indices {req.modules} but {n_modules} modules are loaded")
    if len(req.strengths) != n_modules:
        raise AppError(f"strength: {len(req.strengths)} values for {n_modules} modules")
    if not 1 <= req.num_images <= 16:
        raise AppError(f"number of images: expected 1..16, got {req.num_images}")
    if not 1 <= req.steps <= 1000:
        raise AppError(f"steps: expected 1..1000, got {req.steps}")
    lo, hi = req.window
    if not 0 <= lo < hi <= 1:
        raise AppError(f"modulation window: expected 0 <= low < high <= 1 (noise fractions, 1 = pure noise), "
                       f"got low={lo:g}, high={hi:g}")
    if req.seed < 0 or req.seed != int(req.seed):
        raise AppError(f"seed: expected a non-negative integer, got {req.seed}")


# ---- 2. scores -----------------------------------------------------------------------------------------
@torch.no_grad()
def score_samples(images: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor], plugins: Mapping[str, Any],
                  judges: Mapping[str, Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per sample and row (``images``: name -> ``(B, 3, H, W)``), the judges' alignment with each map.

    Segmentation: mIoU and object (foreground) IoU; partial mask: mIoU on known pixels; sketch: edge F1
    (1 px tolerance); depth: delta1 after scale-and-shift alignment; as ``mcm evaluate`` computes them.
    """
    from mcm.evaluation import metrics as M

    rows = [{"sample": i, "seed": s} for i, s in enumerate(seeds)]
    seg, depth = judges.get("segmentation"), judges.get("depth")
    for row_name, x in images.items():
        B = x.shape[0]
        labels = seg.predict(x) if seg is not None and {"segmentation", "partial_mask"} & set(maps) else None
        pred_depth = depth.predict(x) if depth is not None and "depth" in maps else None
        for i in range(B):
            r = rows[i]
            if labels is not None and "segmentation" in maps:
                t = maps["segmentation"][0]
                K = plugins["segmentation"].num_classes
                r[f"seg mIoU ({row_name})"] = M.segmentation_alignment(labels[i:i + 1], t[None], K)["miou"]
                r[f"object IoU ({row_name})"] = float(foreground_iou(labels[i][None], t[None])[0])
            if labels is not None and "partial_mask" in maps:
                K = plugins["partial_mask"].num_classes
                r[f"partial mIoU ({row_name})"] = M.partial_alignment(labels[i:i + 1], maps["partial_mask"][:1],
                                                                      K)["miou"]
            if "sketch" in maps:
                p = plugins["sketch"]
                opts = {k: getattr(p, k, None) for k in ("low_threshold", "high_threshold", "sigma")}
                r[f"sketch F1 ({row_name})"] = M.sketch_alignment(x[i:i + 1], maps["sketch"][:1], 1, **opts)["f1"]
            if pred_depth is not None:
                r[f"depth δ1 ({row_name})"] = M.depth_alignment(pred_depth[i:i + 1], maps["depth"][:1])["delta1"]
    out = []
    for r in rows:  # each metric's rows side by side: "seg mIoU (base)", "seg mIoU (MCM)", ...
        metrics = list(dict.fromkeys(k.rsplit(" (", 1)[0] for k in r if k.endswith(")")))
        keys = ["sample", "seed"] + [f"{m} ({row})" for m in metrics for row in images if f"{m} ({row})" in r]
        out.append({k: (None if math.isnan(r[k]) else round(r[k], 3)) if isinstance(r[k], float) else r[k]
                    for k in keys})
    return out


# ---- 3. the Python call --------------------------------------------------------------------------------
def _module_ref(m: str) -> str:
    from mcm.pipelines.module_io import BUILTIN_MODULES

    return m if m in BUILTIN_MODULES else str(Path(m).resolve())


def _base_ref(base: str) -> str:
    from mcm.models.frozen_base import BUILTIN_BASES

    return base if base in BUILTIN_BASES else str(Path(base).resolve())


def python_call(session: "Session | Any", req: Request) -> str:
    """The script that reproduces a run (the same images, same seeds); it reads the maps from ``conditions.npz``."""
    from mcm.pipelines.pipeline import window_arguments

    n = req.num_images
    used = [session.models[i] for i in req.modules]
    weights = [session.pipe.weights[i] for i in req.modules]
    modules = [session.modules[i] for i in req.modules]
    sched = SCHEDULERS[req.scheduler]
    w = "" if all(x == 1.0 for x in weights) else f", weights={weights!r}"
    lines = ["# Reproduces the images of an `mcm app` run; conditions.npz (in the same zip) holds the maps.",
             "import numpy as np", "import torch", f"from diffusers import {sched}", "",
             "from mcm import MCMPipeline", "",
             f"pipe = MCMPipeline.from_pretrained({_base_ref(session.base_name)!r}, "
             f"modules={[_module_ref(m) for m in used]!r}{w})",
             f"pipe.scheduler = {sched}.from_config(pipe.scheduler.config)",
             'maps = np.load("conditions.npz")']
    dicts = []
    for m in modules:
        items = [f'    "{k}": torch.from_numpy(maps["{k}"]),  # {tuple(v.expand(n, *v.shape[1:]).shape)}'
                 for k, v in req.maps.items() if k in m.plugins]
        dicts.append("{\n" + "\n".join(items) + "\n}")
    lines.append("conditions = " + (dicts[0] if len(dicts) == 1 else "[" + ", ".join(dicts) + "]  # one per module"))
    strengths = [float(req.strengths[i]) for i in req.modules]
    if req.region is not None:
        lines.append('region = torch.from_numpy(maps["region"])  # (H, W): 1 where the modules act, 0 elsewhere')
        s = [f"{v!r} * region" for v in strengths]
    else:
        s = [repr(v) for v in strengths]
    strength = s[0] if len(s) == 1 else "[" + ", ".join(s) + "]"
    args = []
    if session.is_text_conditional:
        args.append(f"prompt={(req.prompt or None)!r}")
        if req.negative_prompt:
            args.append(f"negative_prompt={req.negative_prompt!r}")
    if req.class_label is not None:
        args.append(f"class_labels={[req.class_label] * n!r}")
    args += [f"num_inference_steps={req.steps}", f"guidance_scale={float(req.guidance_scale)!r}",
             f"seeds={req.seeds!r}", 'output_type="pt"']
    lines.append(f"settings = dict({', '.join(args)})")
    window = ", ".join(f"{k}={v!r}" for k, v in window_arguments(req.window).items())
    lines.append(f"images = pipe(conditions=conditions, conditioning_scale={strength}, {window}, **settings).images"
                 f"  # base + modules: ({n}, 3, H, W) in [0, 1]")
    lines.append(f"base = pipe(conditions={{}}, num_images={n}, **settings).images  # the base alone, same seeds")
    return "\n".join(lines) + "\n"


# ---- 4. files ------------------------------------------------------------------------------------------
def save_result(result: Result, out: str | Path) -> dict[str, Path]:
    """Write the run: ``mcm_images.png`` / ``base_images.png`` (a row of samples, native size), one PNG per
    sample, ``conditions.npz``, ``reproduce.py``, ``scores.json``, and all of it as ``mcm_app_run.zip``."""
    from torchvision.utils import save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, x in (("mcm", result.mcm), ("base", result.base)):
        files[f"{name}_images.png"] = out / f"{name}_images.png"
        save_image(x, files[f"{name}_images.png"], nrow=x.shape[0], padding=0)
        for i in range(x.shape[0]):
            p = out / f"{name}_{i}.png"
            save_image(x[i], p)
            files[p.name] = p
    for k, v in result.conditions.items():
        p = out / f"condition_{k}.png"
        save_image(v, p)
        files[p.name] = p
    np.savez(out / "conditions.npz", **result.arrays)
    files["conditions.npz"] = out / "conditions.npz"
    (out / "reproduce.py").write_text(result.code)
    files["reproduce.py"] = out / "reproduce.py"
    (out / "scores.json").write_text(json.dumps(result.scores, indent=2) + "\n")
    files["scores.json"] = out / "scores.json"
    with zipfile.ZipFile(out / "mcm_app_run.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name, p in files.items():
            z.write(p, name)
    files["mcm_app_run.zip"] = out / "mcm_app_run.zip"
    return files


def upscale(x: torch.Tensor, target: int = 192) -> list[np.ndarray]:
    """``(B, 3, H, W)`` in [0, 1] -> uint8 HWC images blown up (nearest) to about ``target`` pixels, for display."""
    k = max(1, target // max(x.shape[-2:]))
    x = F.interpolate(x.float(), scale_factor=k, mode="nearest") if k > 1 else x
    return [(im.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy() for im in x]
