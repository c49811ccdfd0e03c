"""The FLUX.2 family (Black Forest Labs 2025, FLUX.2 [dev]): ``Flux2Transformer2DModel`` with flow matching.

As ``Flux2Pipeline``:

- the context is Mistral-3-Small's hidden states of layers 10, 20 and 30, stacked along the channels, over the
  prompt in the pipeline's chat (its system message, then the prompt; 512 tokens, padded), through the pipeline's
  own function (``Flux2Pipeline._get_mistral_3_small_prompt_embeds``), with the 4-axis text positions;
- guidance is distilled: the scale is an input of the transformer (default 4), one branch, no negative prompt;
- latents are the VAE's (``AutoencoderKLFlux2``) posterior mode, *patchified* 2x2 into 4 x its channels (128 for
  the released model) and normalised by the VAE's batch-norm statistics; the transformer sees this grid as tokens
  in raster order with 4-axis ``img_ids``.  Sampling draws the noise on that grid, uses the sigmas
  ``linspace(1, 1/N, N)`` and the empirical shift ``mu`` of the number of tokens *and* of steps.

The model space (what the MCM sees and where noise is drawn) is that patchified grid ``(B, 4 C, H/2f, W/2f)``: the
pipeline draws its noise there, so seed for seed equality needs it, and it is still a spatial map, each position a
2x2 patch of latent pixels (16 pixels of a 1024 px image per position with the x8 VAE).  Training draws ``t``
logit-normally over the scheduler's timesteps (``FlowMatchingProcess``), the guidance input at the default.
Not reproduced: reference images (``image=``, FLUX.2's editing input) and prompt upsampling; FLUX.2 [klein] (the
same transformer with a Qwen3 text encoder, ``Flux2KleinPipeline``) is not this family; diffusers has no FLUX.2
ControlNet; ``mcm.attach`` on a ``Flux2Pipeline`` (its denoiser sees tokens) is refused with a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mcm.models.base_flux import DistilledGuidance, flow_sigma_kwargs
from mcm.models.base_loading import vae_downsample
from mcm.models.families import denoiser_config
from mcm.models.prompt_dict_base import PromptDictBase

MAX_SEQUENCE_LENGTH = 512  # Flux2Pipeline's default max_sequence_length
TEXT_ENCODER_OUT_LAYERS = (10, 20, 30)  # and text_encoder_out_layers
DEFAULT_SAMPLE_SIZE = 128  # Flux2Pipeline.default_sample_size: 1024 px with the x8 VAE (64 patchified positions)
TEXT_ENCODER = "Mistral3ForConditionalGeneration"


class Flux2Base(DistilledGuidance, PromptDictBase):
    display_name = "FLUX.2"
    family = "flux2"
    denoiser_class = "Flux2Transformer2DModel"
    no_controlnet_reason = "diffusers has no ControlNet for FLUX.2"
    packs_latents = True  # the denoiser sees tokens, not the spatial grid: mcm.attach is refused
    prompt_option_names = ("max_sequence_length", "text_encoder_out_layers")

    @classmethod
    def claims_directory(cls, path: Path) -> bool:
        """A ``Flux2Transformer2DModel`` with Mistral-3 prompts (not FLUX.2 [klein]'s Qwen3, another pipeline)."""
        found = denoiser_config(path)
        if found is None or found[1].get("_class_name") != cls.denoiser_class:
            return False
        cfg = path / "text_encoder" / "config.json"
        return not cfg.is_file() or TEXT_ENCODER in (json.loads(cfg.read_text()).get("architectures") or [])

    # ---- facts -----------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def default_guidance_scale(self) -> float:
        return 4.0  # Flux2Pipeline's default

    @property
    def vae_scale_factor(self) -> int:
        return vae_downsample(self.vae) if self.vae is not None else 8

    @property
    def downsample(self) -> int:
        return 2 * self.vae_scale_factor  # image pixels per position of the patchified grid

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)  # 4 x the VAE's: the patchified latent

    @property
    def sample_size(self) -> tuple[int, int]:
        s = DEFAULT_SAMPLE_SIZE * self.vae_scale_factor // self.downsample
        return (s, s)

    def timestep_kwargs(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int]) -> dict:
        """``Flux2Pipeline``'s sigmas and its empirical shift ``mu`` of the number of tokens and of steps."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        kwargs = flow_sigma_kwargs(scheduler, num_inference_steps)
        if kwargs is None:
            return {}  # another scheduler: its own timesteps
        return {**kwargs, "mu": compute_empirical_mu(latent_size[0] * latent_size[1], num_inference_steps)}

    # ---- the VAE, patchified and batch-normalised ---------------------------------------------------------
    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> the posterior's mode (a sample with ``generator``), patchified 2x2
        and normalised by the VAE's batch-norm statistics (``Flux2Pipeline._encode_vae_image``)."""
        from diffusers import Flux2Pipeline

        if self.vae is None:
            raise ValueError(f"the FLUX.2 base '{self.source}' needs its vae/ (AutoencoderKLFlux2) to encode images")
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = Flux2Pipeline._patchify_latents(dist.sample(generator) if generator is not None else dist.mode())
        mean, std = self._bn_stats(z)
        return ((z - mean) / std).float().contiguous()

    @torch.no_grad()
    def decode(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        z = x.to(self.vae.dtype)
        mean, std = self._bn_stats(z)
        out = self.vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample.float()
        return out.clamp(-1, 1) if clamp else out

    # ---- context ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from diffusers import Flux2Pipeline
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"the FLUX.2 base '{self.source}' needs text_encoder/ (Mistral-3) and tokenizer/ (its "
                             "processor)")
        opts = self._prompt_options  # the pipeline's own arguments, where a call gives them
        embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            self.text_encoder, self.tokenizer, list(prompts), device=self.device,
            max_sequence_length=opts.get("max_sequence_length", MAX_SEQUENCE_LENGTH), system_message=SYSTEM_MESSAGE,
            hidden_states_layers=opts.get("text_encoder_out_layers", TEXT_ENCODER_OUT_LAYERS))
        return {"prompt_embeds": embeds}

    def model_kwargs(self, context) -> dict:
        from diffusers import Flux2Pipeline

        context = self.check_context(context)
        emb = context["prompt_embeds"]
        return {"encoder_hidden_states": emb.to(self.unet.dtype),
                "txt_ids": Flux2Pipeline._prepare_text_ids(emb).to(emb.device), **self.guidance_kwargs(context)}

    # ---- the denoiser on tokens --------------------------------------------------------------------------
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        B, C, h, w = x.shape
        img_ids = Flux2Pipeline._prepare_latent_ids(x).to(x.device)
        out = self.unet(hidden_states=Flux2Pipeline._pack_latents(x), timestep=t.to(x.dtype) / 1000,
                        img_ids=img_ids, **kwargs, **extra, return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(B, C, h, w)  # tokens in raster order: the pipeline's unpacking
