"""The Sana family (Xie et al. 2024, arXiv 2410.10629): ``SanaTransformer2DModel``, a linear-attention DiT with
flow matching, over the latents of a deep-compression autoencoder (``AutoencoderDC``, x32, 32 channels), and a
Gemma-2 text encoder.

As ``SanaPipeline``:

- prompts are lower-cased and stripped (``clean_caption`` off), prefixed with the pipeline's "complex human
  instruction", tokenised to the instruction's length + 300 - 2 and encoded by Gemma-2 with the tokenizer's
  attention mask; the first token and the last 299 are kept (Sana paper, §3.1).  The negative prompt (``""`` by
  default) is encoded without the instruction to 300 tokens;
- classifier-free guidance ``p_u + w (p_c - p_u)`` (default 4.5), the velocity is the first half of the output
  where the transformer predicts a learned variance;
- the transformer takes ``timestep * timestep_scale``; the scheduler (DPM-Solver++ with ``flow_prediction``, or
  flow-matching Euler) sets its own timesteps;
- latents are ``AutoencoderDC.encode(x).latent * scaling_factor``.

Training draws ``t`` logit-normally over the flow sigmas shifted by the scheduler's ``flow_shift``
(``FlowMatchingProcess``).  Not reproduced: ``clean_caption`` and resolution binning (``MCMPipeline`` samples at the
requested size; ``SanaPipeline(..., use_resolution_binning=False)`` is the equal call).
"""
from __future__ import annotations

import torch

from mcm.models.prompt_dict_base import PromptDictBase

MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's default max_sequence_length
#: SanaPipeline's default complex_human_instruction, joined by newlines and put before every (positive) prompt
COMPLEX_HUMAN_INSTRUCTION = "\n".join([
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])


class SanaBase(PromptDictBase):
    display_name = "Sana"
    family = "sana"
    controlnet_kind = "sana_controlnet"
    denoiser_class = "SanaTransformer2DModel"
    aspect_ratio_bin_tables = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
                               16: "ASPECT_RATIO_512_BIN"}  # SanaPipeline's choice by sample_size

    # ---- facts -----------------------------------------------------------------------------------------
    @property
    def default_guidance_scale(self) -> float:
        return 4.5  # SanaPipeline's default

    @property
    def prediction_type(self) -> str:
        return "flow"  # DPM-Solver's "flow_prediction", flow-matching Euler's velocity

    # ---- the deep-compression autoencoder ----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> ``AutoencoderDC`` latents times ``scaling_factor`` (deterministic:
        the autoencoder has no posterior to sample; ``generator`` is unused)."""
        if self.vae is None:
            raise ValueError(f"the Sana base '{self.source}' needs its vae/ (AutoencoderDC) to encode images")
        z = self.vae.encode(images.to(self.vae.dtype)).latent
        return (z * self.vae.config.scaling_factor).float().contiguous()

    # ---- context ---------------------------------------------------------------------------------------
    def _gemma(self, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"the Sana base '{self.source}' has no text_encoder/ or tokenizer/; expected Gemma-2's")
        self.tokenizer.padding_side = "right"
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``SanaPipeline.encode_prompt`` for the prompts: the instruction first, then the first token and the
        last 299 kept."""
        prompts = [COMPLEX_HUMAN_INSTRUCTION + p.lower().strip() for p in prompts]
        n = len(self.tokenizer.encode(COMPLEX_HUMAN_INSTRUCTION)) if self.tokenizer is not None else 0
        out = self._gemma(prompts, n + MAX_SEQUENCE_LENGTH - 2)
        keep = [0] + list(range(-MAX_SEQUENCE_LENGTH + 1, 0))
        return {k: v[:, keep] for k, v in out.items()}

    @torch.no_grad()
    def uncond_context(self, batch_size: int, negative_prompt=None, image_size=None):
        """The negative prompt (``""``) as the pipeline encodes it: without the instruction, 300 tokens."""
        neg = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch_size
        return self._gemma([p.lower().strip() for p in neg], MAX_SEQUENCE_LENGTH)

    def model_kwargs(self, context) -> dict:
        context = self.check_context(context)
        return {"encoder_hidden_states": context["prompt_embeds"].to(self.unet.dtype),
                "encoder_attention_mask": context["prompt_attention_mask"]}

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        timestep = t * self.unet.config.timestep_scale
        return self.unet(x, timestep=timestep, **kwargs, **extra, return_dict=False)[0]
