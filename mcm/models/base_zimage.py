"""The Z-Image family (Z-Image team 2025, "Z-Image: an efficient image generation foundation model with
single-stream diffusion transformer"): ``ZImageTransformer2DModel``, a single-stream DiT with flow matching, a Qwen3
text encoder and FLUX's 16-channel VAE.

As ``ZImagePipeline``:

- each prompt goes through the tokenizer's chat template (one user message, generation prompt, ``enable_thinking``),
  is padded to 512 tokens, and the text encoder's second-to-last hidden states of its valid tokens are its
  embedding (prompts keep their own lengths: the transformer takes a list);
- the transformer takes a list of latents ``(C, 1, h, w)``, the timestep as ``(1000 - t) / 1000`` and returns the
  negative velocity; guidance is ``p_c + w (p_c - p_u)``, on for ``guidance_scale > 0`` (default 5; Z-Image-Turbo
  samples at 0), the negative prompt ``""`` by default;
- sampling uses the sigmas ``linspace(1, 1/N, N)`` and the dynamic shift ``mu`` from the number of 2x2 patches;
- latents are ``(z - shift_factor) * scaling_factor``.

Not reproduced: ``cfg_normalization`` and ``cfg_truncation`` (off at the pipeline's defaults).
"""
from __future__ import annotations

import torch

from mcm.models.base_flux import check_packable, packed_flow_timestep_kwargs
from mcm.models.prompt_dict_base import RaggedPromptBase, stack_ragged

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default max_sequence_length
DEFAULT_SAMPLE_SIZE = 128  # 1024 px with the x8 VAE


def caption_list(context: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each prompt's valid token embeddings, as the transformer (and its ControlNet) take them: a list."""
    return [e[m.bool()].to(dtype) for e, m in zip(context["prompt_embeds"], context["prompt_embeds_mask"])]


class ZImageBase(RaggedPromptBase):
    display_name = "Z-Image"
    family = "zimage"
    controlnet_kind = "zimage_controlnet"
    denoiser_class = "ZImageTransformer2DModel"

    # ---- facts -----------------------------------------------------------------------------------------
    @property
    def default_guidance_scale(self) -> float:
        return 5.0  # ZImagePipeline's default

    @property
    def guidance_threshold(self) -> float:
        return 0.0  # guidance is on for any scale > 0: p_c + w (p_c - p_u)

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> tuple[int, int]:
        return (DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLE_SIZE)

    # ---- context ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``ZImagePipeline._encode_prompt``: the chat template, 512 tokens, the second-to-last hidden states of
        each prompt's valid tokens."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"the Z-Image base '{self.source}' needs text_encoder/ (Qwen3) and tokenizer/")
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True) for p in prompts]
        tokens = self.tokenizer(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return stack_ragged([h[m] for h, m in zip(hidden, mask)], self.device)

    def combine_guidance(self, p_u: torch.Tensor, p_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """``ZImagePipeline``'s guidance: ``p_c + w (p_c - p_u)`` (its ``w`` is CFG's ``w - 1``)."""
        return p_c + guidance_scale * (p_c - p_u)

    def model_kwargs(self, context) -> dict:
        return {"context": self.check_context(context)}

    # ---- sampling ----------------------------------------------------------------------------------------
    def timestep_kwargs(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int]) -> dict:
        """``ZImagePipeline``'s sigmas and dynamic shift ``mu`` (FLUX's rule, from the number of 2x2 patches)."""
        return packed_flow_timestep_kwargs(scheduler, num_inference_steps, latent_size)

    # ---- the denoiser on lists ---------------------------------------------------------------------------
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        check_packable(self, *x.shape[-2:])
        context = kwargs.pop("context")
        out = self.unet(list(x.unsqueeze(2).unbind(0)), (1000 - t.float()) / 1000,
                        caption_list(context, self.unet.dtype), **kwargs, **extra, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # the transformer predicts x0 - noise
