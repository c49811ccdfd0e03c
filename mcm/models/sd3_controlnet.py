"""ControlNet for the SD3 family: diffusers' ``SD3ControlNetModel.from_transformer`` as an adapter.

A trainable copy of the first transformer blocks of the frozen ``SD3Transformer2DModel`` (12 by
default, as diffusers' SD3 ControlNet training does) whose zero-initialised outputs are added to the
frozen transformer's blocks (``block_controlnet_hidden_states``).  Its conditioning enters through its
zero-initialised patch embedding ``pos_embed_input`` in *latent* space: diffusers' SD3 ControlNet
pipelines VAE-encode an RGB control image there; our modality maps (one-hot labels, sketches, depth)
are not RGB images, so the concatenated ``plugin.to_channels`` maps are resized to the latent size
(bilinear) and padded with zero channels to the transformer's input width — what the patch embedding
learns from is the maps themselves.  A strength map scales the residual tokens patch by patch.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import SD3ControlNetModel

import modalities as modality_registry

from mcm.models.wrapped_export import WrappedModelExport
from mcm.models.adapter import Adapter, BasePrediction, conditioning_image, repeat_batch, scale_tokens

ADAPTER_FILE = "mcm_sd3_controlnet.json"


class SD3ControlNetAdapter(WrappedModelExport, Adapter):
    """A diffusers ``SD3ControlNetModel`` + the modality plugins that make its (latent-size) conditioning.

    Args:
        controlnet: the ``SD3ControlNetModel`` (``from_base`` builds it from a base's transformer).
        modalities: plugin name -> options.
        downsample: the base's VAE factor (image pixels per latent pixel).
        default_strength: the conditioning scale used when sampling with ``strength=None``.
    """

    export_file = ADAPTER_FILE
    wrapped_attribute = "controlnet"
    wrapped_class = SD3ControlNetModel
    export_kind = "SD3 ControlNet adapter"
    adapter_key = "sd3_controlnet"
    checkpoint_model_key = "controlnet"
    method_name = "ControlNet"

    def __init__(self, controlnet: SD3ControlNetModel, modalities: dict[str, dict[str, Any]], downsample: int = 8,
                 default_strength: float = 1.0):
        super().__init__()
        channels = self.set_modalities(modalities, downsample, default_strength)
        self.controlnet = controlnet
        cfg = controlnet.config
        self.cond_channels = cfg.in_channels + cfg.extra_conditioning_channels
        if channels > self.cond_channels:
            raise ValueError(f"controlnet: takes {self.cond_channels} conditioning channels but the modalities "
                             f"{self.modality_names} give {channels}")

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

    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """Raw maps -> ``(B, in + extra channels, h, w)`` at the latent size ``size``."""
        w = self.controlnet.pos_embed_input.proj.weight
        H, W = size[0] * self.downsample, size[1] * self.downsample
        image = conditioning_image(self, conditions, present, (H, W), batch_size, w.device, w.dtype)
        cond = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False) if (H, W) != tuple(size) \
            else image
        return F.pad(cond, (0, 0, 0, 0, 0, self.cond_channels - cond.shape[1]))

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        if context is None:
            context = base.encode_context(None, batch_size=x_t.shape[0])
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        dt = self.controlnet.dtype
        kw = {k: v.to(dt) for k, v in base.model_kwargs(context).items()}
        blocks = self.controlnet(hidden_states=x_t.to(dt), controlnet_cond=repeat_batch(state, x_t.shape[0]).to(dt),
                                 timestep=t, return_dict=False, **kw)[0]
        p = self.controlnet.config.patch_size
        blocks = [scale_tokens(b, strength, (x_t.shape[-2] // p, x_t.shape[-1] // p)) for b in blocks]
        return base.predict_with_residuals(x_t, t, context, transformer_block_residuals=blocks)

    @classmethod
    def from_parts(cls, controlnet, cfg: dict) -> "SD3ControlNetAdapter":
        return cls(controlnet, cfg["modalities"], cfg.get("downsample", 8), cfg.get("default_strength", 1.0))
