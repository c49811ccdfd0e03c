"""The FLUX.1 family (Black Forest Labs 2024): ``FluxTransformer2DModel`` with flow matching.

As ``FluxPipeline``: the context is T5's last hidden states (``max_sequence_length`` 512 tokens) and CLIP's pooled
output; the transformer takes the latents packed 2x2 into tokens with their ``img_ids`` (row, column) and
``txt_ids`` (zeros), ``timestep / 1000``, and, for FLUX.1-dev (``guidance_embeds``), the distilled guidance scale
as an input instead of classifier-free guidance (FLUX.1-schnell has neither).  The MCM works on the spatial
latent ``(B, C, h, w)``: :meth:`_denoise` packs before the transformer and unpacks its velocity after.
Sampling uses the pipeline's sigmas ``linspace(1, 1/N, N)`` and its dynamic shift ``mu`` from the number of image
tokens (:meth:`timestep_kwargs`).

Training draws ``t`` as diffusers' ``train_dreambooth_flux.py`` does (logit-normal over the training scheduler's
timesteps, which the dynamic shift leaves unshifted) with the guidance input at the family's default (3.5).
Not reproduced: true classifier-free guidance with a negative prompt (``true_cfg_scale``); ``mcm.attach`` on a
``FluxPipeline`` (its denoiser sees packed tokens) is refused with a clear error.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from mcm.models.base_loading import _load_component, load_denoiser, load_optional
from mcm.models.prompt_dict_base import PromptDictBase

T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px with the x8 VAE


def calculate_shift(image_seq_len: int, config) -> float:
    """``FluxPipeline``'s ``mu`` for ``image_seq_len`` packed tokens, from the scheduler's config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as shift

    return shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def flow_sigma_kwargs(scheduler, num_inference_steps: int) -> dict | None:
    """The sigmas ``linspace(1, 1/N, N)`` the FLUX-style pipelines give a flow-matching scheduler (none where its
    config asks for its own flow sigmas); ``None`` for a scheduler that takes no ``sigmas`` and ``mu`` (a DDIM
    grid: its own timesteps)."""
    accepts = inspect.signature(scheduler.set_timesteps).parameters
    if "sigmas" not in accepts or "mu" not in accepts:
        return None
    if scheduler.config.get("use_flow_sigmas", False):
        return {}
    return {"sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)}


def packed_flow_timestep_kwargs(scheduler, num_inference_steps: int, latent_size: tuple[int, int]) -> dict:
    """The sigmas and dynamic shift ``mu`` (from the number of 2x2-packed tokens) that ``FluxPipeline`` and
    ``QwenImagePipeline`` give their flow-matching scheduler; ``{}`` for another scheduler."""
    kwargs = flow_sigma_kwargs(scheduler, num_inference_steps)
    if kwargs is None:
        return {}
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift((latent_size[0] // 2) * (latent_size[1] // 2), scheduler.config)
    return kwargs


def check_packable(base, h: int, w: int) -> None:
    """A clear error for a latent the 2x2 packing cannot take."""
    if h % 2 or w % 2:
        raise ValueError(f"the {base.display_name} base '{base.source}' packs latents 2x2: expected an even latent "
                         f"size, got {h}x{w} (the image size must be a multiple of {2 * base.downsample} pixels)")


class PackedFlow:
    """What the families whose transformer sees the latents packed 2x2 into tokens share (FLUX.1, Qwen-Image):
    flow velocity, 4 x fewer latent channels than the transformer's input, 1024 px by default, and the pipelines'
    sigmas with the dynamic shift.  A mixin before the context base class: ``class F(PackedFlow, PromptDictBase)``."""

    packs_latents = True

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels) // 4  # the transformer sees 2x2 patches of them

    @property
    def sample_size(self) -> tuple[int, int]:
        return (DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLE_SIZE)

    def timestep_kwargs(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int]) -> dict:
        """The pipeline's sigmas and dynamic shift ``mu`` (from the number of packed tokens)."""
        return packed_flow_timestep_kwargs(scheduler, num_inference_steps, latent_size)


class DistilledGuidance:
    """What the guidance-distilled families share (FLUX.1-dev, FLUX.2-dev): the guidance scale is an input of the
    transformer (``guidance_embeds``), one branch, no classifier-free guidance; without the embedding (FLUX.1-schnell)
    there is no guidance at all.  A mixin before the context base class."""

    @property
    def uses_cfg(self) -> bool:
        return False  # guidance is an input of the transformer (dev) or absent (schnell), not two branches

    def with_guidance(self, context: dict, guidance_scale: float) -> dict:
        """The context with the guidance input (the pipeline's ``guidance_scale``)."""
        if not self.unet.config.guidance_embeds:
            return context
        B = context["prompt_embeds"].shape[0]
        return {**context, "guidance": torch.full((B,), float(guidance_scale), device=self.device)}

    def guidance_kwargs(self, context: dict) -> dict:
        """``{"guidance": ...}`` for a transformer with the embedding: the context's, else (training, cached
        predictions) the family's default scale; ``{}`` without it."""
        if not self.unet.config.guidance_embeds:
            return {}
        g = context.get("guidance")
        emb = context["prompt_embeds"]
        return {"guidance": g if g is not None else torch.full((emb.shape[0],), self.default_guidance_scale,
                                                                device=emb.device)}


class FluxBase(DistilledGuidance, PackedFlow, PromptDictBase):
    display_name = "FLUX"
    family = "flux"
    controlnet_kind = "flux_controlnet"
    denoiser_class = "FluxTransformer2DModel"
    extra_component_names = ("text_encoder_2", "tokenizer_2")

    @classmethod
    def load_components(cls, path: Path) -> dict:
        parts = {"unet": load_denoiser(path, "transformer"),
                 "scheduler": _load_component(path, "scheduler", "diffusers", None),
                 "vae": load_optional(path, "vae", "diffusers")}
        for i in ("", "_2"):
            parts[f"text_encoder{i}"] = load_optional(path, f"text_encoder{i}", "transformers")
            parts[f"tokenizer{i}"] = load_optional(path, f"tokenizer{i}", "transformers")
        return parts

    # ---- facts -----------------------------------------------------------------------------------------
    @property
    def default_guidance_scale(self) -> float:
        return 3.5  # ``FluxPipeline``'s default (the distilled guidance input of FLUX.1-dev)


    # ---- context ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise ValueError(f"the FLUX base '{self.source}' needs text_encoder/ (CLIP) and text_encoder_2/ (T5)")
        clip_ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_overflowing_tokens=False, return_length=False,
                                  return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(list(prompts), padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                  return_length=False, return_overflowing_tokens=False,
                                  return_tensors="pt").input_ids.to(self.device)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return {"prompt_embeds": embeds, "pooled": pooled}

    def model_kwargs(self, context) -> dict:
        context = self.check_context(context)
        dt = self.unet.dtype
        emb = context["prompt_embeds"]
        return {"encoder_hidden_states": emb.to(dt), "pooled_projections": context["pooled"].to(dt),
                "txt_ids": torch.zeros(emb.shape[1], 3, device=emb.device, dtype=dt), **self.guidance_kwargs(context)}

    # ---- the denoiser on packed tokens -------------------------------------------------------------------
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        from diffusers import FluxPipeline

        B, C, h, w = x.shape
        check_packable(self, h, w)
        tokens = FluxPipeline._pack_latents(x, B, C, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x.device, x.dtype)
        out = self.unet(hidden_states=tokens, timestep=t.to(x.dtype) / 1000, img_ids=img_ids, **kwargs, **extra,
                        return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.downsample, w * self.downsample, self.downsample)
