"""The SD3 family (Esser et al. 2024): ``SD3Transformer2DModel`` with flow matching.

The transformer predicts the velocity ``noise - x0`` of ``x_t = (1 - sigma) x0 + sigma noise``
(``FlowMatchEulerDiscreteScheduler``); the training forward process is
:class:`mcm.diffusion.forward_process.FlowMatchingProcess`.  Context as
``StableDiffusion3Pipeline.encode_prompt``: the two CLIP encoders' penultimate hidden states
concatenated and zero-padded to the joint width, then T5's tokens (zeros when T5 is absent, as in
diffusers), and both CLIPs' pooled outputs concatenated.  VAE latents are ``(z - shift) * scale``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mcm.models.base_loading import _load_component, load_denoiser, load_optional
from mcm.models.prompt_dict_base import PromptDictBase

T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


class SD3Base(PromptDictBase):
    display_name = "SD3"
    family = "sd3"
    controlnet_kind = "sd3_controlnet"
    denoiser_class = "SD3Transformer2DModel"
    extra_component_names = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")

    @classmethod
    def load_components(cls, path: Path) -> dict:
        parts = {"unet": load_denoiser(path, "transformer"),
                 "scheduler": _load_component(path, "scheduler", "diffusers", None),
                 "vae": load_optional(path, "vae", "diffusers")}
        for i in ("", "_2", "_3"):
            parts[f"text_encoder{i}"] = load_optional(path, f"text_encoder{i}", "transformers")
            parts[f"tokenizer{i}"] = load_optional(path, f"tokenizer{i}", "transformers")
        return parts

    @property
    def default_guidance_scale(self) -> float:
        return 7.0  # ``StableDiffusion3Pipeline``'s default

    @property
    def prediction_type(self) -> str:
        return "flow"

    # ---- context ---------------------------------------------------------------------------------------
    def _clip(self, tok, enc, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tok(list(prompts), padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        out = enc(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        e1, p1 = self._clip(self.tokenizer, self.text_encoder, prompts)
        e2, p2 = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        joint = self.unet.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), T5_MAX_LENGTH, joint, device=self.device, dtype=e1.dtype)
        else:
            ids = self.tokenizer_3(list(prompts), padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = self.text_encoder_3(ids)[0]
        clip = torch.cat([e1, e2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled": torch.cat([p1, p2], dim=-1)}

    def model_kwargs(self, context) -> dict:
        context = self.check_context(context)
        dt = self.unet.dtype
        return {"encoder_hidden_states": context["prompt_embeds"].to(dt), "pooled_projections": context["pooled"].to(dt)}
