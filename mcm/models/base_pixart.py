"""The PixArt-Σ family (Chen et al. 2024, arXiv 2403.04692): ``PixArtTransformer2DModel`` with a T5 text encoder.

Context as ``PixArtSigmaPipeline.encode_prompt``: T5's last hidden states for the prompt padded to
``max_sequence_length`` (300) tokens, with the tokenizer's attention mask, which the transformer takes as
``encoder_attention_mask``; the unconditional branch is the encoded negative prompt (``""``), not zeros.
``added_cond_kwargs`` carries no resolution or aspect ratio (PixArt-Σ, unlike PixArt-α, does not use them).
The transformer predicts epsilon and a learned variance; the variance half is split off
(``FrozenBase._predict``), as the pipeline does.  Its training forward process is the variance-preserving
one of the scheduler config (``DDPMScheduler.from_config``), as for Stable Diffusion.

Not reproduced: the pipeline's ``clean_caption`` text cleaning (it needs ``beautifulsoup4`` and ``ftfy`` and
is skipped without them; prompts here are lower-cased and stripped, as the pipeline does without it) and its resolution binning (``MCMPipeline``
samples at the requested size; ``PixArtSigmaPipeline(..., use_resolution_binning=False)`` is the equal call).
"""
from __future__ import annotations

import torch

from mcm.models.prompt_dict_base import PromptDictBase

MAX_SEQUENCE_LENGTH = 300  # PixArtSigmaPipeline's default max_sequence_length
#: PixArt-Σ's added conditions: none (the pipeline passes these Nones)
ADDED_COND = {"resolution": None, "aspect_ratio": None}


class PixArtSigmaBase(PromptDictBase):
    display_name = "PixArt-Σ"
    family = "pixart_sigma"
    no_controlnet_reason = "diffusers has no ControlNet for PixArt-Σ"
    denoiser_class = "PixArtTransformer2DModel"
    aspect_ratio_bin_tables = {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
                               32: "ASPECT_RATIO_256_BIN"}  # PixArtSigmaPipeline's choice by sample_size

    @property
    def default_guidance_scale(self) -> float:
        return 4.5  # ``PixArtSigmaPipeline``'s default

    # ---- context ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"the PixArt-Σ base '{self.source}' has no text_encoder/ or tokenizer/; expected T5's")
        prompts = [p.lower().strip() for p in prompts]  # the pipeline's _text_preprocessing (clean_caption off)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def model_kwargs(self, context) -> dict:
        context = self.check_context(context)
        return {"encoder_hidden_states": context["prompt_embeds"].to(self.unet.dtype),
                "encoder_attention_mask": context["prompt_attention_mask"], "added_cond_kwargs": dict(ADDED_COND)}
