"""The Qwen-Image family (Qwen team 2025, "Qwen-Image technical report"): ``QwenImageTransformer2DModel``, a
20-billion-parameter MMDiT with flow matching, over latents of its own video VAE (``AutoencoderKLQwenImage``).

As ``QwenImagePipeline``:

- the context is the last hidden states of Qwen2.5-VL over the prompt wrapped in the pipeline's chat template,
  the template's first 34 tokens dropped, with a mask of the valid tokens (``prompt_embeds_mask``); prompts of
  one batch are padded to the longest;
- guidance is "true" classifier-free guidance, on only when a negative prompt is given (``true_cfg_scale``, default
  4): ``p_u + w (p_c - p_u)`` rescaled per 2x2 patch to the conditional prediction's norm (:meth:`combine_guidance`);
- the transformer takes the latents packed 2x2 into tokens with their ``img_shapes``, ``timestep / 1000``; sampling
  uses the sigmas ``linspace(1, 1/N, N)`` and the dynamic shift ``mu`` from the number of tokens, as FLUX does;
- latents are the VAE posterior's mean of the single frame, normalised per channel by the VAE's ``latents_mean`` /
  ``latents_std``.

The MCM works on the spatial latent ``(B, C, h, w)``: :meth:`_denoise` packs before the transformer and unpacks
after.  Training draws ``t`` logit-normally (``FlowMatchingProcess``) and drops captions to the empty prompt.
Not reproduced: the guidance-distilled ``guidance`` input (Qwen-Image has none); ``mcm.attach`` on a
``QwenImagePipeline`` (its denoiser sees packed tokens) is refused with a clear error.
"""
from __future__ import annotations

import torch

from mcm.models.base_flux import PackedFlow, check_packable
from mcm.models.prompt_dict_base import RaggedPromptBase, stack_ragged

#: QwenImagePipeline's prompt template and the number of its leading tokens it drops from the hidden states
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_DROP = 34
MAX_SEQUENCE_LENGTH = 1024  # the pipeline's tokenizer_max_length and max_sequence_length


class QwenImageBase(PackedFlow, RaggedPromptBase):
    display_name = "Qwen-Image"
    family = "qwenimage"
    controlnet_kind = "qwenimage_controlnet"
    denoiser_class = "QwenImageTransformer2DModel"

    # ---- facts -----------------------------------------------------------------------------------------
    @property
    def default_guidance_scale(self) -> float:
        return 4.0  # QwenImagePipeline's true_cfg_scale (used only with a negative prompt)

    @property
    def guidance_needs_negative_prompt(self) -> bool:
        return True

    # ---- the VAE: one frame, normalised per channel ----------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> ``(z - latents_mean) / latents_std`` of the single frame (the
        posterior's mean; a sample with ``generator``), as ``QwenImageImg2ImgPipeline`` encodes an image."""
        if self.vae is None:
            raise ValueError(f"the Qwen-Image base '{self.source}' needs its vae/ to encode images")
        dist = self.vae.encode(images.to(self.vae.dtype)[:, :, None]).latent_dist
        z = (dist.sample(generator) if generator is not None else dist.mean)[:, :, 0]
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).float().contiguous()

    @torch.no_grad()
    def decode(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        if self.vae is None:
            raise ValueError(f"the Qwen-Image base '{self.source}' needs its vae/ to decode latents")
        z = x.to(self.vae.dtype)
        mean, std = self._latent_stats(z)
        # the pipeline's latents / (1 / std) + mean, in that order of operations
        out = self.vae.decode((z / (1.0 / std) + mean)[:, :, None]).sample[:, :, 0].float()
        return out.clamp(-1, 1) if clamp else out

    # ---- context ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``QwenImagePipeline.encode_prompt``: the template's hidden states without its first 34 tokens, each
        prompt's valid tokens first, padded to the batch's longest (mask 0), at most 1,024 tokens."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"the Qwen-Image base '{self.source}' needs text_encoder/ (Qwen2.5-VL) and tokenizer/")
        tokens = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts],
                                max_length=MAX_SEQUENCE_LENGTH + PROMPT_TEMPLATE_DROP, padding=True, truncation=True,
                                return_tensors="pt").to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        valid = [h[m.bool()][PROMPT_TEMPLATE_DROP:][:MAX_SEQUENCE_LENGTH] for h, m in zip(hidden, tokens.attention_mask)]
        return stack_ragged([v.to(self.text_encoder.dtype) for v in valid], self.device)

    def combine_guidance(self, p_u: torch.Tensor, p_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """``QwenImagePipeline``'s true CFG: ``p_u + w (p_c - p_u)`` rescaled per packed token (a 2x2 patch of all
        channels) to the norm of the conditional prediction."""
        comb = p_u + guidance_scale * (p_c - p_u)
        B, C, h, w = comb.shape

        def patches(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B, C, h // 2, 2, w // 2, 2)

        ratio = torch.linalg.vector_norm(patches(p_c), dim=(1, 3, 5), keepdim=True) \
            / torch.linalg.vector_norm(patches(comb), dim=(1, 3, 5), keepdim=True)
        return (patches(comb) * ratio).reshape(B, C, h, w)

    def model_kwargs(self, context) -> dict:
        context = self.check_context(context)
        return {"encoder_hidden_states": context["prompt_embeds"].to(self.unet.dtype),
                "encoder_hidden_states_mask": context["prompt_embeds_mask"]}

    # ---- the denoiser on packed tokens -------------------------------------------------------------------
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        B, C, h, w = x.shape
        check_packable(self, h, w)
        tokens = QwenImagePipeline._pack_latents(x, B, C, h, w)
        out = self.unet(hidden_states=tokens, timestep=t.to(x.dtype) / 1000, img_shapes=[[(1, h // 2, w // 2)]] * B,
                        **kwargs, **extra, return_dict=False)[0]
        out = QwenImagePipeline._unpack_latents(out, h * self.downsample, w * self.downsample, self.downsample)
        return out[:, :, 0]
