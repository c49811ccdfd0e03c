"""ControlNet for the SD3 family: diffusers' ``SD3ControlNetModel.from_transformer`` as an adapter.

A trainable copy of the first transformer blocks of the frozen ``SD3Transformer2DModel`` (12 by
default, as diffusers' SD3 ControlNet training does) whose zero-initialised outputs are added to the
frozen transformer's blocks (``block_controlnet_hidden_states``).  Its conditioning enters through its
zero-initialised patch embedding ``pos_embed_input`` in latent space (``mcm.models.latent_controlnet``: the
maps resized to the latent and padded to the transformer's input width plus its extra conditioning channels).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3ControlNetModel

import modalities as modality_registry

from mcm.models.adapter import BasePrediction, repeat_batch, scale_tokens
from mcm.models.latent_controlnet import LatentControlNetAdapter

ADAPTER_FILE = "mcm_sd3_controlnet.json"


class SD3ControlNetAdapter(LatentControlNetAdapter):
    """A diffusers ``SD3ControlNetModel`` + the modality plugins that make its (latent-size) conditioning."""

    export_file = ADAPTER_FILE
    wrapped_class = SD3ControlNetModel
    export_kind = "SD3 ControlNet adapter"
    adapter_key = "sd3_controlnet"

    @classmethod
    def conditioning_width(cls, controlnet: SD3ControlNetModel) -> int:
        return controlnet.config.in_channels + controlnet.config.extra_conditioning_channels

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], num_layers: int = 12) -> "SD3ControlNetAdapter":
        plugins = modality_registry.build_all(modalities)
        channels = sum(p.channels for p in plugins.values())
        extra = max(0, channels - base.unet.config.in_channels)
        n = base.unet.config.num_layers
        if n < 2:
            raise ValueError(f"base '{base.source}': an SD3 ControlNet copies transformer blocks before the last one "
                             f"(the last is context-only); this transformer has {n}")
        layers = min(num_layers, n - 1)
        controlnet = SD3ControlNetModel.from_transformer(base.unet, num_layers=layers,
                                                         num_extra_conditioning_channels=extra).float()
        return cls(controlnet, modalities, base.downsample)

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        context, t, kw = self.step_inputs(base, x_t, t, context)
        dt = self.controlnet.dtype
        # as StableDiffusion3ControlNetPipeline reads the ControlNet's config: zero pooled projections (InstantX's and
        # from_transformer's default) and no prompt tokens for a ControlNet without joint attention (SD3.5's 8B)
        if self.controlnet.config.force_zeros_for_pooled_projection:
            kw["pooled_projections"] = torch.zeros_like(kw["pooled_projections"])
        if self.controlnet.config.joint_attention_dim is None:
            kw["encoder_hidden_states"] = None
        blocks = self.controlnet(hidden_states=x_t.to(dt), controlnet_cond=repeat_batch(state, x_t.shape[0]).to(dt),
                                 timestep=t, return_dict=False, **kw)[0]
        p = self.controlnet.config.patch_size
        blocks = [scale_tokens(b, strength, (x_t.shape[-2] // p, x_t.shape[-1] // p)) for b in blocks]
        return base.predict_with_residuals(x_t, t, context, transformer_block_residuals=blocks)
