"""``MCMPipeline``: a frozen base plus adapters (MCM, ControlNet, T2I-Adapter), as a diffusers pipeline.

    from mcm import MCMPipeline
    pipe = MCMPipeline.from_pretrained("shapes32")            # embedded base + shipped module, offline
    images = pipe(conditions={"segmentation": labels}, num_inference_steps=50).images   # PIL images

A ``diffusers.DiffusionPipeline``: components registered with ``register_modules`` (the base's
``unet``, ``scheduler``, ``vae``, ``text_encoder``, ``tokenizer``, and ``adapters``), so
``save_pretrained`` / ``from_pretrained`` of the whole directory, ``to(device, dtype)``,
``progress_bar``, ``callback_on_step_end``, ``enable_model_cpu_offload`` and ``output_type``
through ``VaeImageProcessor`` behave as in diffusers.  Like a diffusers pipeline it owns no
math: the loop lives in :mod:`mcm.diffusion.sampling` and :mod:`mcm.diffusion.control`.
With no conditions (or zero-initialised adapters) it gives the family's diffusers pipeline's
images, seed for seed (``tests/test_scheduler_oracle.py``).
"""
import difflib
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, SchedulerMixin,
                       SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)
from diffusers.image_processor import PixArtImageProcessor, VaeImageProcessor
from diffusers.utils import BaseOutput, deprecate
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import modalities as modality_registry
from modalities import ModalityError

from mcm.diffusion.control import Control, controlled_sample
from mcm.diffusion.sampling import generators_for
from mcm.diffusion.strength import parse_strength, spatial_map
from mcm.models.base_loading import vae_downsample
from mcm.models.frozen_base import FrozenBase, check_base
from mcm.pipelines.adapter_stack import AdapterStack
from mcm.pipelines.module_io import BUILTIN_MODULES, base_of, load_module

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class MCMPipelineOutput(BaseOutput):
    """What ``MCMPipeline.__call__`` returns (diffusers' ``ImagePipelineOutput`` habit).

    Args:
        images: a list of PIL images, a numpy array ``(B, H, W, 3)``, a float tensor ``(B, 3, H, W)`` in [0, 1],
            or the latents, as ``output_type`` asked.
    """

    images: Union[list, np.ndarray, torch.Tensor]


_EXTRA_COMPONENTS = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
PIPELINE_INDEX = "model_index.json"


def _default_scheduler(base: FrozenBase):
    """The scheduler a pipeline samples with unless told otherwise.

    The base directory's own, as diffusers' pipelines do (SD's PNDM, SDXL's Euler, SD3's flow matching), so
    ``from_pretrained(dir, modules=[])`` gives the family pipeline's images with no scheduler swap; DDIM
    (docs/concepts.md#the-mcm) where the directory ships DDPM, a training scheduler (the embedded ``shapes32``).
    """
    if type(base.scheduler).__name__ == "DDPMScheduler":
        return DDIMScheduler.from_config(base.scheduler.config)
    return base.scheduler


class MCMPipeline(DiffusionPipeline):
    """Frozen base + adapters + scheduler.  See ``__call__`` for the arguments."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                            "tokenizer_3", "adapters"]
    # the adapters are ~1% of the base and called outside forward(): they stay on the execution device
    _exclude_from_cpu_offload = ["adapters"]

    def __init__(self, unet: Union[UNet2DConditionModel, UNet2DModel, DiTTransformer2DModel, SD3Transformer2DModel],
                 scheduler: SchedulerMixin, vae: Optional[AutoencoderKL] = None,
                 text_encoder: Optional[PreTrainedModel] = None, tokenizer: Optional[PreTrainedTokenizerBase] = None,
                 adapters: Optional[AdapterStack] = None, text_encoder_2: Optional[PreTrainedModel] = None,
                 tokenizer_2: Optional[PreTrainedTokenizerBase] = None, text_encoder_3: Optional[PreTrainedModel] = None,
                 tokenizer_3: Optional[PreTrainedTokenizerBase] = None):
        super().__init__()
        # unet: the denoiser of any family (SD/SDXL UNet, DiT or SD3 transformer), one name for the loop
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, adapters=adapters, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_downsample(vae))
        self._frozen_base: FrozenBase | None = None

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: FrozenBase, modules: Sequence = (), weights: Sequence[float] | None = None,
                  scheduler=None, infos: Sequence[dict] | None = None) -> "MCMPipeline":
        """A pipeline around a loaded ``FrozenBase`` and adapter objects (DDIM unless ``scheduler``)."""
        stack = AdapterStack(list(modules), weights, infos) if len(modules) else None
        if stack is None and weights:
            raise ValueError(f"weights: got {len(weights)} weights for 0 modules")
        extra = {k: getattr(base, k) for k in base.extra_component_names if k in _EXTRA_COMPONENTS}
        pipe = cls(base.unet, scheduler or _default_scheduler(base), base.vae, base.text_encoder, base.tokenizer,
                   stack, **extra)
        pipe._frozen_base = base
        return pipe

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, base: str | Path | FrozenBase | None = None,
                        modules: Sequence[str | Path] | None = None, weights: Sequence[float] | None = None,
                        force_base: bool = False, device: str | torch.device | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "MCMPipeline":
        """Load a base and its adapter(s), offline.

        * ``from_pretrained("shapes32")``: the embedded base and its shipped multimodal MCM;
        * ``from_pretrained("path/to/exported_mcm")``: an ``mcm export`` directory; its base is
          read from ``mcm_base.json`` unless ``base`` is given;
        * ``from_pretrained(base, modules=[mcm_a, mcm_b], weights=[1, 1])``: compose several
          adapters on ``base`` (docs/concepts.md#composition); ``modules=[]`` gives the base alone;
        * ``from_pretrained(dir)`` of a directory written by ``MCMPipeline.save_pretrained``.
        """
        path = Path(str(name_or_path))
        if modules is None and base is None and _is_saved_pipeline(path):
            pipe = super().from_pretrained(path, torch_dtype=torch_dtype, **kwargs)
            pipe.base.source = str(path)
            if pipe.adapters is not None:
                for info in pipe.adapters.infos:
                    check_base(info, pipe.base, force_base, f"the adapter saved in '{path}'")
            return pipe.to(device) if device is not None else pipe
        if modules is None:
            paths = [name_or_path]
            if base is None:
                base = "shapes32" if str(name_or_path) in BUILTIN_MODULES else base_of(name_or_path)
        else:
            paths = list(modules)
            base = base if base is not None else name_or_path
        if not isinstance(base, FrozenBase):
            base = FrozenBase.from_pretrained(base, torch_dtype=torch_dtype)
        loaded = [load_module(p, base, force_base) for p in paths]
        pipe = cls.from_base(base, [m for m, _ in loaded], weights, infos=[i for _, i in loaded])
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, modules: Sequence = (), weights: Sequence[float] | None = None,
                  force_base: bool = False, scheduler=None) -> "MCMPipeline":
        """Wrap an existing diffusers pipeline's components (not copied) with adapters (objects or paths)."""
        comps = dict(pipeline.components)
        if comps.get("unet") is None and comps.get("transformer") is not None:
            comps["unet"] = comps.pop("transformer")
        missing = [k for k in ("unet", "scheduler") if comps.get(k) is None]
        if missing:
            raise ValueError(f"pipeline: {type(pipeline).__name__} has no {missing}; expected a pipeline with a "
                             f"unet or transformer and a scheduler (StableDiffusionPipeline, StableDiffusionXLPipeline,"
                             f" DiTPipeline, StableDiffusion3Pipeline, DDPMPipeline, ...)")
        if "force_zeros_for_empty_prompt" in pipeline.config:
            comps["force_zeros_for_empty_prompt"] = pipeline.config.force_zeros_for_empty_prompt
        base = FrozenBase.from_components(source=getattr(pipeline, "name_or_path", None) or type(pipeline).__name__,
                                          **comps)
        loaded = [load_module(m, base, force_base) if isinstance(m, (str, Path)) else (m, {}) for m in modules]
        return cls.from_base(base, [m for m, _ in loaded], weights, scheduler or comps["scheduler"],
                             [i for _, i in loaded])

    @property
    def base(self) -> FrozenBase:
        """The frozen base over this pipeline's components (the scheduler is the pipeline's current one)."""
        fb = self._frozen_base
        names = ("unet", "vae", "text_encoder", *_EXTRA_COMPONENTS)
        if fb is None or any(getattr(fb, n, None) is not getattr(self, n, None) for n in names
                             if n in ("unet", "vae", "text_encoder") or n in fb.extra_component_names):
            comps = {n: getattr(self, n, None) for n in ("unet", "vae", "text_encoder", "tokenizer",
                                                           *_EXTRA_COMPONENTS)}
            fb = self._frozen_base = FrozenBase.from_components(source=self.name_or_path, scheduler=self.scheduler,
                                                                **comps)
        fb.scheduler = self.scheduler
        return fb

    @property
    def modules(self) -> list:
        """The adapters, in composition order."""
        return list(self.adapters) if self.adapters is not None else []

    @property
    def weights(self) -> list[float]:
        """The composition weights ``w_i``, one per adapter."""
        return list(self.adapters.weights) if self.adapters is not None else []

    @weights.setter
    def weights(self, values: Sequence[float]) -> None:
        values = [float(v) for v in values]
        if len(values) != len(self.modules):
            raise ValueError(f"weights: got {len(values)} weights for {len(self.modules)} modules")
        if self.adapters is not None:
            self.adapters.weights = values

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

    def _batch_and_size(self, conds: list[dict[str, torch.Tensor]], num_images: int | None,
                        height: int | None = None, width: int | None = None) -> tuple[int, tuple[int, int]]:
        """The batch and the model-space size: the maps' size, else ``height`` / ``width``, else the base's."""
        maps = [(n, x) for c in conds for n, x in c.items()]
        model_size = self.base.sample_size
        ds = self.base.downsample
        if num_images is not None and (not isinstance(num_images, numbers.Integral) or isinstance(num_images, bool)
                                       or num_images < 1):
            raise ValueError(f"num_images: expected a positive integer, got {num_images!r}")
        for name, v in (("height", height), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 or v % ds):
                raise ValueError(f"{name}: expected a positive multiple of {ds} pixels (the base's latent "
                                 f"downsampling), got {v!r}")
        if not maps:
            h = height // ds if height is not None else model_size[0]
            w = width // ds if width is not None else model_size[1]
            return (num_images or 1), (h, w)
        batch = {x.shape[0] for _, x in maps}
        if len(batch) > 1:
            raise ValueError(f"conditions: batch sizes differ: { {n: x.shape[0] for n, x in maps} }")
        sizes = {tuple(x.shape[-2:]) for _, x in maps}
        if len(sizes) > 1:  # the maps' size is the output size: one size for all of them
            raise ValueError(f"conditions: spatial sizes differ: { {n: tuple(x.shape[-2:]) for n, x in maps} }; "
                             f"expected every map at the output size (resize them to one size first)")
        B, (H, W) = batch.pop(), sizes.pop()
        if (height is not None and height != H) or (width is not None and width != W):
            raise ValueError(f"height/width: {height}x{width} given, but the conditions' maps are {H}x{W}; the maps' "
                             f"size is the output size (leave height/width out, or resize the maps)")
        if H % (8 * ds) or W % (8 * ds):
            names = ", ".join(sorted({f"'{n}'" for n, _ in maps}))
            shapes = {n: tuple(x.shape) for n, x in maps}
            raise ModalityError(
                f"modality {names}: expected height and width that are multiples of {8 * ds} (the output size; this "
                f"base was trained at {model_size[0] * ds}x{model_size[1] * ds}), got {H}x{W} maps {shapes}")
        if num_images is not None and num_images != B:
            raise ValueError(f"num_images={num_images} but the conditions hold {B} maps")
        return B, (H // ds, W // ds)

    def prepare_controls(self, conds: list[dict[str, torch.Tensor]], batch_size: int, size: tuple[int, int],
                         conditioning_scale: Any = None, regions: Sequence | None = None,
                         num_inference_steps: int | None = None, name: str = "conditioning_scale") -> list[Control]:
        """One :class:`Control` per adapter: its validated maps resized to the output size, its weight, its scale
        (float, map or schedule; ``num_inference_steps=None``: a list's length is checked step by step) and its
        region, for a batch of ``batch_size`` images of model-space ``size``."""
        H, W = size[0] * self.base.downsample, size[1] * self.base.downsample
        n = len(self.modules)
        strengths = [parse_strength(v, f"{name}[{i}]" if n > 1 and _per_adapter(conditioning_scale) else name,
                                    batch_size, (H, W), size,
                                    num_inference_steps if num_inference_steps is not None else _length(v))
                     for i, v in enumerate(_per_adapter_values(conditioning_scale, n, name))]
        masks = [None if r is None else spatial_map(r, f"regions[{i}]", batch_size, (H, W), size, 0.0, 1.0)
                 for i, r in enumerate(_regions(regions, n))]
        device = self._execution_device
        return [Control(m, {k: m.plugins[k].resize(x, (H, W)).to(device) for k, x in c.items()}, w, s, r)
                for m, c, w, s, r in zip(self.modules, conds, self.weights, strengths, masks)]

    # ---- 2-7. prompts, controls, noise, denoising loop, decode ------------------------------------
    @torch.no_grad()
    def __call__(self, conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, conditioning_scale: Any = None,
                 control_guidance_start: float = 0.0, control_guidance_end: float = 1.0,
                 regions: Sequence | None = None, num_images_per_prompt: int = 1, num_images: int | None = None,
                 class_labels: Sequence[int] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, seeds: list[int] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), eta: float = 0.0,
                 max_sequence_length: int | None = None, text_encoder_out_layers: Sequence[int] | None = None,
                 use_resolution_binning: bool = False, **deprecated: Any) -> MCMPipelineOutput | tuple:
        """Sample images; the arguments follow diffusers' pipelines (``StableDiffusionControlNetPipeline``).

        Args:
            conditions: modality name -> map (tensor, numpy or PIL; label maps ``(H,W)`` or
                ``(B,H,W)`` ints), or one such dict per adapter when composing; ``{}`` = base alone.
            prompt / negative_prompt: text for text-conditional bases (one, or one per image).
            height / width: output size in pixels; default: the maps' size when conditions are given (if given
                too, they must agree), else the base's default size (as the family's diffusers pipeline).
            guidance_scale: classifier-free guidance weight (on when > 1, as in diffusers); ``None`` = the
                family pipeline's own default (SD 7.5, SDXL 5.0, SD3 7.0, DiT 4.0; 1.0 for pixel bases).
            conditioning_scale: the scale ``s`` in ``p + s (p gamma + beta)`` (ControlNet / T2I-Adapter: the
                scale of their residuals; earlier ``strength``); ``None`` = each adapter's recorded
                ``default_strength``.  A float, a map ``(H, W)`` / ``(B, H, W)`` at the output size (resized to
                model space; the baselines' residuals are scaled per level), a schedule (a list with one value
                per inference step, noisiest first, value ``i`` at step ``i``, or a callable of the noise fraction
                ``t / T``), or ``(map, schedule)``; one for all adapters, or a list with one per adapter.
            control_guidance_start / control_guidance_end: the part of the denoising process where the adapters
                act, as fractions of it, 0 = its start (pure noise), measured on the noise level: the adapters act
                where ``1 - t / T`` lies in ``[start, end)`` (earlier ``modulation_window=(lo, hi)``, the noise
                fractions ``t / T``: ``start = 1 - hi``, ``end = 1 - lo``).
            regions: one soft mask in [0, 1] per adapter (``(H, W)`` / ``(B, H, W)``, ``None`` = everywhere):
                ``p_c = p_u + sum_i w_i R_i (p_i - p_u)``.
            num_images_per_prompt: images per prompt (per set of maps / class label), as in diffusers.
            num_images: the batch when no condition, prompt list or class labels say it (default 1).
            seeds: one seed per image (overrides ``generator``; each image reproducible on its own).
            output_type: ``"pil"`` (default), ``"np"`` (float HWC in [0, 1]), ``"pt"`` (float ``(B,3,H,W)``
                in [0, 1]) or ``"latent"``.
            return_dict: return :class:`MCMPipelineOutput` (``.images``); ``False``: the tuple ``(images,)``.
            callback_on_step_end: ``fn(pipe, i, t, {"latents": x}) -> dict`` after each step, as in diffusers.
            max_sequence_length / text_encoder_out_layers: the family pipeline's own prompt-encoding arguments, for
                the families whose pipeline takes them (FLUX.2); ``None`` = the pipeline's defaults.
            use_resolution_binning: PixArt-Σ's and Sana's aspect-ratio binning: sample at the nearest size of the
                pipeline's bin table, then resize and crop to ``height`` x ``width``, as their pipelines do.  Off
                by default here (their pipelines default to on): the size asked for is the size sampled, and the
                maps are at that size.
            strength / modulation_window: the earlier names of ``conditioning_scale`` and of the window
                (deprecated; they still work, with a warning).
        """
        # 1. check inputs (and the earlier argument names)
        conditioning_scale, name, window = _deprecated_names(deprecated, conditioning_scale, control_guidance_start,
                                                             control_guidance_end)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, numbers.Integral) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive integer, got {num_images_per_prompt!r}")
        if guidance_scale is None:
            guidance_scale = self.base.default_guidance_scale
        conds = self.check_inputs(conditions)
        if class_labels is not None and not self.base.is_class_conditional:
            raise ValueError(f"class_labels: the base '{self.base.source}' is not class-conditional "
                             f"(it takes {'prompts' if self.base.is_text_conditional else 'no conditioning'})")
        implied = None  # with no condition: the length of a prompt list or of class_labels
        if not any(conds):
            if isinstance(prompt, (list, tuple)):
                implied = len(prompt)
            elif class_labels is not None:
                implied = len(torch.as_tensor(class_labels).reshape(-1))
        B, size = self._batch_and_size(conds, num_images if num_images is not None else implied, height, width)
        binned_from = None  # the output size asked for, when sampling at a binned size (PixArt-Σ, Sana)
        if use_resolution_binning:
            ds = self.base.downsample
            binned_from = (size[0] * ds, size[1] * ds)
            bh, bw = PixArtImageProcessor.classify_height_width_bin(*binned_from, ratios=self.base.aspect_ratio_bins())
            size = (bh // ds, bw // ds)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1)
            if len(labels) != B:
                raise ValueError(f"class_labels: got {len(labels)} labels for {B} images")
        # 2. prompts (and class labels), each repeated num_images_per_prompt times, as diffusers repeats them
        prompts = None
        if self.base.is_text_conditional:
            prompts = [prompt] * B if isinstance(prompt, str) or prompt is None else list(prompt)
            prompts = ["" if p is None else p for p in prompts]
            if len(prompts) != B:
                raise ValueError(f"prompt: got {len(prompts)} prompts for {B} images")
        elif prompt:
            raise ValueError(f"prompt={prompt!r} given but the base '{self.base.source}' is not text-conditional")
        n_per = int(num_images_per_prompt)
        if n_per > 1:
            prompts = None if prompts is None else [p for p in prompts for _ in range(n_per)]
            if isinstance(negative_prompt, list):
                negative_prompt = [p for p in negative_prompt for _ in range(n_per)]
            if class_labels is not None:
                class_labels = labels.repeat_interleave(n_per).tolist()
            conds = [{k: x.repeat_interleave(n_per, 0) for k, x in c.items()} for c in conds]
            B = B * n_per
        # 3. controls: each adapter with its conditions (resized to the output size), weight, scale and region
        controls = self.prepare_controls(conds, B, size, conditioning_scale, regions, num_inference_steps, name)
        # 4-6. noise, denoising loop (guidance, adapters, composition, scheduler.step)
        if seeds is not None:
            if isinstance(seeds, (str, bytes)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in list(seeds)):
                raise ValueError(f"seeds: expected a list of integers, one per image, got {seeds!r}")
            if len(seeds) != B:
                raise ValueError(f"seeds: got {len(seeds)} seeds for {B} images; give one per image")
        generator = generators_for(seeds, generator)
        callback = None
        if callback_on_step_end is not None:
            def callback(step: dict):
                out = callback_on_step_end(self, step["i"], step["t"], {"latents": step["x"]})
                return (out or {}).get("latents")
        with self.base.prompt_options(max_sequence_length=max_sequence_length,
                                      text_encoder_out_layers=text_encoder_out_layers):
            x0 = controlled_sample(self.base, controls, B, size=size, prompts=prompts,
                                   negative_prompt=negative_prompt, class_labels=class_labels,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   window=window, generator=generator, scheduler=self.scheduler, eta=eta,
                                   latents=latents, callback=callback, progress=self.progress_bar)
        # 7. decode and convert
        if output_type == "latent":
            images = x0
        else:
            image = self.base.decode(x0, clamp=False)
            if binned_from is not None:  # back to the size asked for, as the binning pipelines do
                image = PixArtImageProcessor.resize_and_crop_tensor(image, binned_from[1], binned_from[0])
            images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return MCMPipelineOutput(images=images) if return_dict else (images,)


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




def _is_saved_pipeline(path: Path) -> bool:
    index = path / PIPELINE_INDEX
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == MCMPipeline.__name__


def window_arguments(window: Sequence[float]) -> dict[str, float]:
    """A window of noise fractions ``(lo, hi)`` (``t / T``, 1 = pure noise; ``mcm sample --window``) as the
    call's ``control_guidance_start`` / ``control_guidance_end`` (fractions of the process, 0 = pure noise)."""
    lo, hi = _window(window)
    return {"control_guidance_start": 1.0 - hi, "control_guidance_end": 1.0 - lo}


def _deprecated_names(kwargs: dict[str, Any], conditioning_scale: Any, start: float, end: float
                      ) -> tuple[Any, str, tuple[float, float]]:
    """``conditioning_scale`` and the window as noise fractions ``(lo, hi)``, from the current argument names or
    the earlier ones (``strength``, ``modulation_window``), which still work behind diffusers' ``deprecate``; and
    the name the scale was given by (errors name the argument the caller wrote)."""
    unknown = sorted(set(kwargs) - {"strength", "modulation_window"})
    if unknown:
        raise TypeError(f"MCMPipeline.__call__() got unexpected keyword arguments {unknown}")
    if "strength" in kwargs:
        deprecate("strength", "1.0.0", "`strength` is now `conditioning_scale` (diffusers' name; diffusers' "
                  "`strength` means img2img strength)", standard_warn=False)
        if conditioning_scale is not None:
            raise ValueError("strength and conditioning_scale: give one (strength is the earlier name)")
        conditioning_scale = kwargs["strength"]
    scale_name = "strength" if "strength" in kwargs else "conditioning_scale"
    if "modulation_window" in kwargs:
        deprecate("modulation_window", "1.0.0", "`modulation_window=(lo, hi)` (noise fractions t/T) is now "
                  "`control_guidance_start=1 - hi, control_guidance_end=1 - lo` (fractions of the denoising "
                  "process, 0 = pure noise), as in diffusers", standard_warn=False)
        if (start, end) != (0.0, 1.0):
            raise ValueError("modulation_window and control_guidance_start/end: give one (modulation_window is "
                             "the earlier name)")
        return conditioning_scale, scale_name, _window(kwargs["modulation_window"])
    for name, v in (("control_guidance_start", start), ("control_guidance_end", end)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}: expected a fraction of the denoising process in [0, 1], got {v!r}")
    if start > end:
        raise ValueError(f"control_guidance_start: expected <= control_guidance_end, got {start} > {end}")
    return conditioning_scale, scale_name, (1.0 - float(end), 1.0 - float(start))


def _window(window: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"modulation_window: expected (low, high) noise fractions, got {window!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"modulation_window: expected 0 <= low <= high <= 1 (fractions t/T, 1 = pure noise), "
                         f"got {window!r}")
    return lo, hi


def _per_adapter(value) -> bool:
    """Is ``value`` one entry per adapter (a list of numbers/maps/None), rather than one schedule or map?"""
    return isinstance(value, list) and any(v is None or isinstance(v, (torch.Tensor, np.ndarray, tuple, list))
                                           or callable(v) for v in value)


def _per_adapter_values(value, n: int, name: str) -> list:
    """One strength for all adapters, or a list with one per adapter (``None`` = that adapter's default).

    With several adapters a list of as many numbers gives one number each; any other list of numbers is a
    per-step schedule for all of them; to give each adapter its own schedule, pass a list of lists.
    """
    if isinstance(value, list) and (_per_adapter(value) or (n > 1 and len(value) == n)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} adapters; give one, or one per adapter")
        return list(value)
    return [value] * n


def _length(schedule) -> int:
    """A schedule list's own length (the number of steps it is checked against when the run's is not known)."""
    if isinstance(schedule, tuple) and len(schedule) == 2:
        schedule = schedule[1]
    return len(schedule) if isinstance(schedule, (list, tuple)) else 1


def _regions(regions, n: int) -> list:
    if regions is None:
        return [None] * n
    if not isinstance(regions, (list, tuple)) or len(regions) != n:
        got = len(regions) if isinstance(regions, (list, tuple)) else type(regions).__name__
        raise ValueError(f"regions: expected a list of {n} masks (one per adapter; None = everywhere), got {got}")
    return list(regions)
