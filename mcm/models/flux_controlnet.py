"""ControlNet for the FLUX.1 family: diffusers' ``FluxControlNetModel.from_transformer`` as an adapter.

A trainable copy of the first double- and single-stream blocks of the frozen ``FluxTransformer2DModel`` (as
diffusers' ``train_controlnet_flux.py`` builds it: 2 double-stream and 0 single-stream blocks by default) whose
zero-initialised outputs are added to the frozen transformer's blocks (``controlnet_block_samples`` /
``controlnet_single_block_samples``).  Its conditioning enters through its zero-initialised ``controlnet_x_embedder``
in packed latent space (``mcm.models.latent_controlnet``: the maps resized to the latent, padded to its width and
packed 2x2 like the latents), where ``FluxControlNetPipeline`` puts a VAE-encoded control image.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxControlNetModel

from mcm.models.adapter import BasePrediction, repeat_batch, scale_tokens
from mcm.models.latent_controlnet import LatentControlNetAdapter, pack_2x2

ADAPTER_FILE = "mcm_flux_controlnet.json"


class FluxControlNetAdapter(LatentControlNetAdapter):
    """A diffusers ``FluxControlNetModel`` + the modality plugins that make its packed latent conditioning."""

    export_file = ADAPTER_FILE
    wrapped_class = FluxControlNetModel
    export_kind = "FLUX ControlNet adapter"
    adapter_key = "flux_controlnet"
    packed = True

    @classmethod
    def conditioning_width(cls, controlnet: FluxControlNetModel) -> int:
        return controlnet.config.in_channels // 4  # the packed width is 4 x the latent's

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], num_layers: int = 2,
                  num_single_layers: int = 0) -> "FluxControlNetAdapter":
        cls.check_modalities(base, modalities)
        cfg = base.unet.config
        controlnet = FluxControlNetModel.from_transformer(
            base.unet, num_layers=min(num_layers, cfg.num_layers), num_single_layers=min(num_single_layers,
                                                                                        cfg.num_single_layers),
            attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads).float()
        return cls(controlnet, modalities, base.downsample)

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        from diffusers import FluxPipeline

        context, t, kw = self.step_inputs(base, x_t, t, context)
        B, C, h, w = x_t.shape
        dt = self.controlnet.dtype
        img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x_t.device, dt)
        blocks, single = self.controlnet(hidden_states=pack_2x2(x_t.to(dt)),
                                         controlnet_cond=repeat_batch(state, B).to(dt), timestep=t.to(dt) / 1000,
                                         img_ids=img_ids, return_dict=False, **kw)
        grid = (h // 2, w // 2)
        scaled = [None if r is None else [scale_tokens(b, strength, grid) for b in r] for r in (blocks, single)]
        return base.predict_with_residuals(x_t, t, context, denoiser_kwargs={
            "controlnet_block_samples": scaled[0], "controlnet_single_block_samples": scaled[1]})
