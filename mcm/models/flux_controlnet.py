"""ControlNet for the FLUX.1 family: diffusers' ``FluxControlNetModel.from_transformer`` as an adapter.

A trainable copy of the first double- and single-stream blocks of the frozen ``FluxTransformer2DModel`` (as
diffusers' ``train_controlnet_flux.py`` builds it: 2 double-stream and 0 single-stream blocks by default) whose
zero-initialised outputs are added to the frozen transformer's blocks (``controlnet_block_samples`` /
``controlnet_single_block_samples``).  Its conditioning enters through its zero-initialised ``controlnet_x_embedder``
in packed *latent* space: diffusers' FLUX ControlNet pipelines VAE-encode an RGB control image there; our modality
maps are not RGB images, so the concatenated ``plugin.to_channels`` maps are resized to the latent size (bilinear),
padded with zero channels to the latent width and packed 2x2 like the latents.  A strength map scales the residual
tokens token by token.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import FluxControlNetModel

import modalities as modality_registry

from mcm.models.adapter import Adapter, BasePrediction, conditioning_image, repeat_batch, scale_tokens
from mcm.models.wrapped_export import WrappedModelExport

ADAPTER_FILE = "mcm_flux_controlnet.json"


class FluxControlNetAdapter(WrappedModelExport, Adapter):
    """A diffusers ``FluxControlNetModel`` + the modality plugins that make its (latent-size) conditioning.

    Args:
        controlnet: the ``FluxControlNetModel`` (``from_base`` builds it from a base's transformer).
        modalities: plugin name -> options.
        downsample: the base's VAE factor (image pixels per latent pixel).
        default_strength: the conditioning scale used when sampling with ``strength=None``.
    """

    export_file = ADAPTER_FILE
    wrapped_attribute = "controlnet"
    wrapped_class = FluxControlNetModel
    export_kind = "FLUX ControlNet adapter"
    adapter_key = "flux_controlnet"
    checkpoint_model_key = "controlnet"
    method_name = "ControlNet"

    def __init__(self, controlnet: FluxControlNetModel, modalities: dict[str, dict[str, Any]], downsample: int = 8,
                 default_strength: float = 1.0):
        super().__init__()
        channels = self.set_modalities(modalities, downsample, default_strength)
        self.controlnet = controlnet
        self.latent_channels = controlnet.config.in_channels // 4  # the packed width is 4 x the latent's
        if channels > self.latent_channels:
            raise ValueError(f"controlnet: takes {self.latent_channels} conditioning channels per latent pixel but the "
                             f"modalities {self.modality_names} give {channels}")

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], num_layers: int = 2,
                  num_single_layers: int = 0) -> "FluxControlNetAdapter":
        plugins = modality_registry.build_all(modalities)
        channels = sum(p.channels for p in plugins.values())
        if channels > base.latent_channels:
            raise ValueError(f"modalities: {sorted(plugins)} give {channels} conditioning channels; a FLUX ControlNet "
                             f"takes at most the latent's {base.latent_channels} per pixel (packed 2x2)")
        cfg = base.unet.config
        controlnet = FluxControlNetModel.from_transformer(
            base.unet, num_layers=min(num_layers, cfg.num_layers), num_single_layers=min(num_single_layers,
                                                                                        cfg.num_single_layers),
            attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads).float()
        return cls(controlnet, modalities, base.downsample)

    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """Raw maps -> packed tokens ``(B, h/2 * w/2, 4 C)`` of the latent-size conditioning ``size``."""
        from diffusers import FluxPipeline

        w = self.controlnet.controlnet_x_embedder.weight
        H, W = size[0] * self.downsample, size[1] * self.downsample
        image = conditioning_image(self, conditions, present, (H, W), batch_size, w.device, w.dtype)
        cond = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False) if (H, W) != tuple(size) \
            else image
        cond = F.pad(cond, (0, 0, 0, 0, 0, self.latent_channels - cond.shape[1]))
        return FluxPipeline._pack_latents(cond, batch_size, self.latent_channels, *size)

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        from diffusers import FluxPipeline

        if context is None:
            context = base.encode_context(None, batch_size=x_t.shape[0])
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        B, C, h, w = x_t.shape
        dt = self.controlnet.dtype
        kw = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in base.model_kwargs(context).items()}
        img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x_t.device, dt)
        blocks, single = self.controlnet(hidden_states=FluxPipeline._pack_latents(x_t.to(dt), B, C, h, w),
                                         controlnet_cond=repeat_batch(state, B).to(dt), timestep=t.to(dt) / 1000,
                                         img_ids=img_ids, return_dict=False, **kw)
        grid = (h // 2, w // 2)
        scaled = [None if r is None else [scale_tokens(b, strength, grid) for b in r] for r in (blocks, single)]
        return base.predict_with_residuals(x_t, t, context, denoiser_kwargs={
            "controlnet_block_samples": scaled[0], "controlnet_single_block_samples": scaled[1]})

    @classmethod
    def from_parts(cls, controlnet, cfg: dict) -> "FluxControlNetAdapter":
        return cls(controlnet, cfg["modalities"], cfg.get("downsample", 8), cfg.get("default_strength", 1.0))
