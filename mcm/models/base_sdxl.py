"""The SDXL family (Podell et al. 2023): two CLIP text encoders and size/crop micro-conditioning.

As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden states,
concatenated on channels; the pooled (projected) output of the second encoder; ``time_ids`` =
(original size, crop top-left, target size) of the image, all through ``added_cond_kwargs``.
An empty negative prompt is zeros when the config says ``force_zeros_for_empty_prompt``
(``model_index.json``, true for SDXL base).  The context is a dict of tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mcm.models.base_loading import load_optional
from mcm.models.families import denoiser_config
from mcm.models.frozen_base import FrozenBase


class SDXLBase(FrozenBase):
    family = "sdxl"
    extra_component_names = ("text_encoder_2", "tokenizer_2", "force_zeros_for_empty_prompt")

    @classmethod
    def claims_directory(cls, path: Path) -> bool:
        found = denoiser_config(path)
        return found is not None and found[0] == "unet" and found[1].get("addition_embed_type") == "text_time"

    @classmethod
    def claims_denoiser(cls, denoiser) -> bool:
        return getattr(getattr(denoiser, "config", None), "addition_embed_type", None) == "text_time"

    @classmethod
    def load_components(cls, path: Path) -> dict:
        parts = super().load_components(path)
        parts["text_encoder_2"] = load_optional(path, "text_encoder_2", "transformers")
        parts["tokenizer_2"] = load_optional(path, "tokenizer_2", "transformers")
        index = path / "model_index.json"
        cfg = json.loads(index.read_text()) if index.is_file() else {}
        parts["force_zeros_for_empty_prompt"] = bool(cfg.get("force_zeros_for_empty_prompt", True))
        return parts

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.force_zeros_for_empty_prompt is None:
            self.force_zeros_for_empty_prompt = True

    @property
    def default_guidance_scale(self) -> float:
        return 5.0  # ``StableDiffusionXLPipeline``'s default

    @property
    def is_text_conditional(self) -> bool:
        return True  # by architecture (added_cond_kwargs); without its text encoders it takes cached embeddings

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(s * self.downsample for s in self.sample_size)

    # ---- context ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder_2 is None:
            raise ValueError(f"base '{self.source}': an SDXL base without text_encoder_2/ cannot encode prompts; "
                             f"give cached embeddings (batch['text_emb'])")
        embeds, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            if enc is None:
                continue
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (text_encoder_2)
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(embeds, dim=-1), "text_embeds": pooled}

    def _time_ids(self, batch_size: int, image_size: tuple[int, int] | None) -> torch.Tensor:
        h, w = image_size or self.image_size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).repeat(batch_size, 1)

    @torch.no_grad()
    def encode_context(self, prompts=None, class_labels=None, batch_size: int = 1, image_size=None):
        if class_labels is not None:
            raise ValueError(f"class_labels: the SDXL base '{self.source}' is not class-conditional; it takes prompts")
        ctx = dict(self.encode_text(prompts if prompts is not None else [""] * batch_size))
        ctx["time_ids"] = self._time_ids(ctx["prompt_embeds"].shape[0], image_size)
        return ctx

    @torch.no_grad()
    def uncond_context(self, batch_size: int, negative_prompt=None, image_size=None):
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            ctx = self.encode_text([""] * batch_size)
            ctx = {k: torch.zeros_like(v) for k, v in ctx.items()}
        else:
            neg = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch_size
            ctx = dict(self.encode_text(neg))
        ctx["time_ids"] = self._time_ids(batch_size, image_size)
        return ctx

    def model_kwargs(self, context) -> dict:
        if context is None:
            raise ValueError(f"context: the SDXL base '{self.source}' needs prompt embeddings (\"\" for none)")
        dt = self.unet.dtype
        return {"encoder_hidden_states": context["prompt_embeds"].to(dt),
                "added_cond_kwargs": {"text_embeds": context["text_embeds"].to(dt),
                                      "time_ids": context["time_ids"].to(dt)}}
