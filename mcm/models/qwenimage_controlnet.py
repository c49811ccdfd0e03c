"""ControlNet for the Qwen-Image family: diffusers' ``QwenImageControlNetModel.from_transformer`` as an adapter.

A trainable copy of the first transformer blocks of the frozen ``QwenImageTransformer2DModel`` (5, the InstantX
Qwen-Image ControlNets' depth) whose zero-initialised outputs are added to the frozen transformer's blocks
(``controlnet_block_samples``, each shared by ``ceil(blocks / samples)`` consecutive blocks).  Its conditioning
enters through the zero-initialised ``controlnet_x_embedder`` in packed latent space (``mcm.models.latent_controlnet``),
where ``QwenImageControlNetPipeline`` puts a VAE-encoded control image.

One difference from that pipeline, under true CFG only (a negative prompt and ``guidance_scale > 1``): the pipeline
computes the ControlNet once, with the conditional prompt, and adds the same residuals to the negative branch; here
each branch's ControlNet reads its own prompt, as the SD, SDXL, SD3 and Sana ControlNet pipelines do.  Without a
negative prompt (the default) the two are equal (tests/test_latent_controlnets.py).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageControlNetModel

from mcm.models.adapter import BasePrediction, repeat_batch, scale_tokens
from mcm.models.latent_controlnet import LatentControlNetAdapter, pack_2x2

ADAPTER_FILE = "mcm_qwenimage_controlnet.json"


class QwenImageControlNetAdapter(LatentControlNetAdapter):
    """A diffusers ``QwenImageControlNetModel`` + the modality plugins that make its packed latent conditioning."""

    export_file = ADAPTER_FILE
    wrapped_class = QwenImageControlNetModel
    export_kind = "Qwen-Image ControlNet adapter"
    adapter_key = "qwenimage_controlnet"
    packed = True

    @classmethod
    def conditioning_width(cls, controlnet: QwenImageControlNetModel) -> int:
        cfg = controlnet.config
        return (cfg.in_channels + cfg.extra_condition_channels) // 4  # packed 2x2: 4 x the latent's width

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], num_layers: int = 5
                  ) -> "QwenImageControlNetAdapter":
        cls.check_modalities(base, modalities)
        cfg = base.unet.config
        controlnet = QwenImageControlNetModel.from_transformer(
            base.unet, num_layers=min(num_layers, cfg.num_layers), attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads).float()
        return cls(controlnet, modalities, base.downsample)

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        context, t, kw = self.step_inputs(base, x_t, t, context)
        B, C, h, w = x_t.shape
        dt = self.controlnet.dtype
        blocks = self.controlnet(hidden_states=pack_2x2(x_t.to(dt)), controlnet_cond=repeat_batch(state, B).to(dt),
                                 timestep=t.to(dt) / 1000, img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False,
                                 **kw)
        scaled = [scale_tokens(b, strength, (h // 2, w // 2)) for b in blocks]
        return base.predict_with_residuals(x_t, t, context, denoiser_kwargs={"controlnet_block_samples": scaled})
