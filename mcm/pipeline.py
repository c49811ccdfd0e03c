"""``MCMPipeline``: a frozen base plus one or more MCMs, sampled with any diffusers scheduler.

    from mcm import MCMPipeline
    pipe = MCMPipeline.from_pretrained("shapes32")            # embedded base + shipped module, offline
    images = pipe(conditions={"segmentation": labels}, num_inference_steps=50)   # (B,3,H,W) in [0,1]

Like a diffusers pipeline it orchestrates models and a scheduler and owns no math: the
sampling loop lives in ``mcm.sampling`` / ``mcm.mcm_sampling``.
"""
from __future__ import annotations

import difflib
import json
import logging
import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

import modalities as modality_registry
from modalities import ModalityError

from .frozen_base import WEIGHTS_DIR, FrozenBase
from .mcm_module import check_base
from .mcm_sampling import Control, mcm_sample
from .modulator import MultimodalConditioningModule

log = logging.getLogger(__name__)

BUILTIN_MODULES = {
    "shapes32": WEIGHTS_DIR / "shapes32" / "mcm_multimodal",
    # single-modality modules trained on disjoint halves of the data, to compose (design.md §3)
    "shapes32_compose_segmentation": WEIGHTS_DIR / "shapes32" / "compose_segmentation",
    "shapes32_compose_sketch": WEIGHTS_DIR / "shapes32" / "compose_sketch",
}
BASE_INFO_FILE = "mcm_base.json"


def save_module(module: MultimodalConditioningModule, out: str | Path, base: FrozenBase | dict) -> Path:
    """Write an exported MCM: ``config.json`` + safetensors + ``mcm_base.json`` (base source and hash)."""
    out = Path(out)
    module.save_pretrained(out, safe_serialization=True)
    info = dict(base) if isinstance(base, dict) else {"source": base.source, "hash": base.content_hash(),
                                                      "base_parameters": base.num_parameters()}
    info["mcm_parameters"] = module.num_trainable_parameters()
    (out / BASE_INFO_FILE).write_text(json.dumps(info, indent=2))
    return out


def load_module(path: str | Path, base: FrozenBase | None = None, force_base: bool = False
                ) -> tuple[MultimodalConditioningModule, dict]:
    """Load an exported MCM or ControlNet adapter (safetensors only) and check it matches ``base``."""
    from .controlnet import ControlNetAdapter, is_controlnet_dir

    path = Path(BUILTIN_MODULES.get(str(path), path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' is not an exported MCM (expected config.json + safetensors; "
                                f"make one with `mcm export CKPT OUT`)")
    if is_controlnet_dir(path):
        module = ControlNetAdapter.from_pretrained(path)
    else:
        module = MultimodalConditioningModule.from_pretrained(path, use_safetensors=True)
    info = json.loads((path / BASE_INFO_FILE).read_text()) if (path / BASE_INFO_FILE).is_file() else {}
    if base is not None:
        check_base(info, base, force_base, f"the MCM at '{path}'")
    return module.eval(), info


def _base_of(module_dir: Path) -> str:
    info_file = module_dir / BASE_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file} is missing: pass base=... to say which base this MCM modulates")
    return json.loads(info_file.read_text())["source"]


class MCMPipeline:
    """Frozen base + MCMs + scheduler.  See ``__call__`` for the arguments."""

    def __init__(self, base: FrozenBase, modules: Sequence[MultimodalConditioningModule] = (),
                 weights: Sequence[float] | None = None, scheduler=None):
        self.base = base
        self.modules = list(modules)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.modules)
        if len(self.weights) != len(self.modules):
            raise ValueError(f"weights: got {len(self.weights)} weights for {len(self.modules)} modules")
        self.scheduler = scheduler or DDIMScheduler.from_config(base.scheduler.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, base: str | Path | FrozenBase | None = None,
                        modules: Sequence[str | Path] | None = None, weights: Sequence[float] | None = None,
                        force_base: bool = False, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | None = None) -> "MCMPipeline":
        """Load a base and its MCM(s), offline.

        * ``from_pretrained("shapes32")``: the embedded base and its shipped multimodal MCM;
        * ``from_pretrained("path/to/exported_mcm")``: an ``mcm export`` directory; its base is
          read from ``mcm_base.json`` unless ``base`` is given;
        * ``from_pretrained(base, modules=[mcm_a, mcm_b], weights=[1, 1])``: compose several
          MCMs on ``base`` (design.md §3); ``modules=[]`` gives the base alone.
        """
        if modules is None:
            paths = [name_or_path]
            if base is None:
                base = "shapes32" if str(name_or_path) in BUILTIN_MODULES else _base_of(Path(name_or_path))
        else:
            paths = list(modules)
            base = base if base is not None else name_or_path
        if not isinstance(base, FrozenBase):
            base = FrozenBase.from_pretrained(base, torch_dtype=torch_dtype)
        loaded = [load_module(p, base, force_base)[0] for p in paths]
        return cls(base.to(device), [m.to(device) for m in loaded], weights)

    def to(self, device: str | torch.device) -> "MCMPipeline":
        self.base.to(device)
        self.modules = [m.to(device) for m in self.modules]
        return self

    @property
    def device(self) -> torch.device:
        return self.base.device

    # ---- 1. inputs ----------------------------------------------------------------------------------
    def check_inputs(self, conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
                     ) -> list[dict[str, torch.Tensor]]:
        """One dict of validated, batched raw maps per module (a single dict is shared by all)."""
        if conditions is None:
            conditions = {}
        if not isinstance(conditions, (Mapping, list, tuple)):
            raise ValueError(f"conditions: expected a dict of modality name -> map (or one dict per module), "
                             f"got {type(conditions).__name__}")
        per_module = list(conditions) if isinstance(conditions, (list, tuple)) else [conditions] * len(self.modules)
        if self.modules and len(per_module) != len(self.modules):
            raise ValueError(f"conditions: got {len(per_module)} dicts for {len(self.modules)} modules")
        if not self.modules and conditions:
            names = sorted({str(n) for c in (per_module or [conditions]) if isinstance(c, Mapping) for n in c})
            raise ModalityError(f"modality {names}: this pipeline has no MCM, so it cannot use conditions")
        out = []
        for module, conds in zip(self.modules, per_module):
            if not isinstance(conds, Mapping):
                raise ValueError(f"conditions: expected a dict of modality name -> map, got {type(conds).__name__}")
            unknown = sorted(str(n) for n in set(conds) - set(module.modality_names))
            if unknown:
                raise ModalityError(_unusable_modalities(unknown, module.modality_names))
            out.append({n: module.plugins[n].to_tensor(x) for n, x in conds.items()})
        return out

    def _batch_and_size(self, conds: list[dict[str, torch.Tensor]], num_images: int | None
                        ) -> tuple[int, tuple[int, int]]:
        maps = [(n, x) for c in conds for n, x in c.items()]
        s = self.base.unet.config.sample_size
        model_size = (s, s) if isinstance(s, int) else tuple(s)
        if num_images is not None and (not isinstance(num_images, numbers.Integral) or isinstance(num_images, bool)
                                       or num_images < 1):
            raise ValueError(f"num_images: expected a positive integer, got {num_images!r}")
        if not maps:
            return (num_images or 1), model_size
        batch = {x.shape[0] for _, x in maps}
        if len(batch) > 1:
            raise ValueError(f"conditions: batch sizes differ: { {n: x.shape[0] for n, x in maps} }")
        sizes = {tuple(x.shape[-2:]) for _, x in maps}
        if len(sizes) > 1:  # the maps' size is the output size: one size for all of them
            raise ValueError(f"conditions: spatial sizes differ: { {n: tuple(x.shape[-2:]) for n, x in maps} }; "
                             f"expected every map at the output size (resize them to one size first)")
        B, (H, W) = batch.pop(), sizes.pop()
        ds = self.base.downsample
        if H % (8 * ds) or W % (8 * ds):
            names = ", ".join(sorted({f"'{n}'" for n, _ in maps}))
            shapes = {n: tuple(x.shape) for n, x in maps}
            raise ModalityError(
                f"modality {names}: expected height and width that are multiples of {8 * ds} (the output size; this "
                f"base was trained at {model_size[0] * ds}x{model_size[1] * ds}), got {H}x{W} maps {shapes}")
        if num_images is not None and num_images != B:
            raise ValueError(f"num_images={num_images} but the conditions hold {B} maps")
        return B, (H // ds, W // ds)

    # ---- 2-6. encode, sample, decode -----------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 prompt: str | list[str] | None = None, num_images: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, strength: float = 1.0,
                 generator: torch.Generator | None = None, output_type: str = "pt",
                 modulation_window: tuple[float, float] = (0.0, 1.0), negative_prompt: str = "",
                 seeds: list[int] | None = None, callback=None):
        """Sample images.

        Args:
            conditions: modality name -> map (tensor, numpy or PIL; label maps ``(H,W)`` or
                ``(B,H,W)`` ints), or one such dict per module when composing; ``{}`` = base alone.
            prompt: text for text-conditional bases (one, or one per image).
            num_images: batch size when no condition is given (default 1).
            guidance_scale: classifier-free guidance weight (1 = off).
            strength: modulation strength ``s`` in ``p + s (p gamma + beta)``.
            modulation_window: (start, end) fractions of the schedule where modulation is on
                (0 = the noisiest step).
            seeds: one seed per image (overrides ``generator`` for the initial noise).
            output_type: ``"pt"`` (float tensor in [0, 1]), ``"np"`` (uint8 HWC) or ``"pil"``.
        """
        # 1. check inputs
        conds = self.check_inputs(conditions)
        B, size = self._batch_and_size(conds, num_images)
        if not 0 <= modulation_window[0] <= modulation_window[1] <= 1:
            raise ValueError(f"modulation_window: expected 0 <= start <= end <= 1, got {modulation_window}")
        # 2. prompts
        prompts = None
        if self.base.is_text_conditional:
            prompts = [prompt] * B if isinstance(prompt, str) or prompt is None else list(prompt)
            prompts = ["" if p is None else p for p in prompts]
            if len(prompts) != B:
                raise ValueError(f"prompt: got {len(prompts)} prompts for {B} images")
        elif prompt:
            raise ValueError(f"prompt={prompt!r} given but the base '{self.base.source}' is not text-conditional")
        # 3. controls: each module with its conditions and weight; resize maps to the output size
        H, W = size[0] * self.base.downsample, size[1] * self.base.downsample
        controls = [Control(m, {n: m.plugins[n].resize(x, (H, W)).to(self.device) for n, x in c.items()}, w)
                    for m, c, w in zip(self.modules, conds, self.weights)]
        # 4-5. sample and decode
        images = mcm_sample(self.base, controls, prompts, B, size, num_inference_steps, guidance_scale, strength,
                            tuple(modulation_window), generator, seeds, self.scheduler, callback, negative_prompt)
        # 6. output
        return to_output(images, output_type)


def _unusable_modalities(names: list[str], trained: list[str]) -> str:
    """Why each of ``names`` cannot be used with a module trained on ``trained``: not installed, or not trained on."""
    installed = modality_registry.list_modalities()
    why = []
    for n in names:
        if n in installed:
            why.append(f"modality '{n}': this module was trained on {trained} only, not on '{n}'")
            continue
        close = difflib.get_close_matches(n, trained + installed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        why.append(f"modality '{n}' is unknown: expected one of {trained} (installed: {installed}){hint}")
    return "; ".join(why)


def to_output(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return images
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(a) for a in arr]
    raise ValueError(f"output_type: expected 'pt', 'np' or 'pil', got {output_type!r}")
