"""T2I-Adapter as an adapter of the frozen base (Mou et al., arXiv 2302.08453): a third baseline.

``T2IAdapterControl`` wraps diffusers' ``T2IAdapter`` (``full_adapter``): a small encoder of
the conditioning image (the concatenated ``plugin.to_channels`` maps, as for ControlNet) whose
multi-scale features are added inside the frozen UNet's down blocks
(``down_intrablock_additional_residuals``, as ``StableDiffusionAdapterPipeline`` does).  Its
features do not depend on ``x_t`` or ``t``, so ``encode_conditions`` runs the encoder once per
sampling run; ``controlled_prediction`` runs the base with them, times ``strength``.

Where a base's down blocks do not halve the resolution the way Stable Diffusion's do (the ``shapes32``
base's first blocks are plain ``DownBlock2D``, whose residual the UNet adds *after* downsampling), each
feature level is resized (bilinear) to the resolution at which the UNet adds it; for SD layouts nothing
is resized.

Exported as a plain diffusers ``T2IAdapter`` directory plus ``mcm_t2i_adapter.json`` (the plugins).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import T2IAdapter, UNet2DConditionModel

import modalities as modality_registry

from mcm.models.wrapped_export import WrappedModelExport
from mcm.models.adapter import Adapter, BasePrediction, conditioning_image, repeat_batch, scale_residual

ADAPTER_FILE = "mcm_t2i_adapter.json"


def intrablock_factors(down_block_types: list[str]) -> list[int]:
    """Per down block, the model-space downsampling at which ``UNet2DConditionModel`` adds a T2I residual:
    inside cross-attention blocks before their downsampler, after the others (and their downsampler)."""
    n = len(down_block_types)
    return [2 ** i if ("CrossAttn" in bt or i == n - 1) else 2 ** (i + 1) for i, bt in enumerate(down_block_types)]


class T2IAdapterControl(WrappedModelExport, Adapter):
    """A diffusers ``T2IAdapter`` + the modality plugins that make its conditioning image.

    Args:
        adapter: the ``T2IAdapter`` (``from_base`` builds one matching a base's UNet).
        modalities: plugin name -> options (same as the MCM's and the data module's).
        downsample: the base's model-space downsampling (1 pixel, 8 Stable Diffusion).
        default_strength: the feature scale used when sampling with ``strength=None``.
        level_factors: per feature level, the model-space downsampling the UNet adds it at (``None``:
            as the adapter makes them).
    """

    export_file = ADAPTER_FILE
    wrapped_attribute = "adapter"
    wrapped_class = T2IAdapter
    export_kind = "T2I-Adapter"
    adapter_key = "t2i_adapter"
    checkpoint_model_key = "t2i_adapter"
    method_name = "T2I-Adapter"

    def __init__(self, adapter: T2IAdapter, modalities: dict[str, dict[str, Any]], downsample: int = 1,
                 default_strength: float = 1.0, level_factors: list[int] | None = None):
        super().__init__()
        self.level_factors = list(level_factors) if level_factors is not None else None
        channels = self.set_modalities(modalities, downsample, default_strength)
        self.adapter = adapter
        if adapter.config.in_channels != channels:
            raise ValueError(f"adapter: in_channels={adapter.config.in_channels} but the modalities "
                             f"{self.modality_names} give {channels} channels")

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], num_res_blocks: int = 2
                  ) -> "T2IAdapterControl":
        """A ``full_adapter`` with one feature level per UNet down block, at that block's width."""
        if not isinstance(base.unet, UNet2DConditionModel):
            raise ValueError(f"base '{base.source}': T2I-Adapter needs a UNet2DConditionModel base (its features "
                             f"enter the UNet's down blocks), got {type(base.unet).__name__}; use an MCM instead")
        if not modalities:
            raise ValueError("modalities: T2I-Adapter needs at least one, e.g. {'segmentation': {'num_classes': 6}}")
        plugins = modality_registry.build_all(modalities)
        factors = intrablock_factors(list(base.unet.config.down_block_types))
        adapter = T2IAdapter(in_channels=sum(p.channels for p in plugins.values()),
                             channels=list(base.unet.config.block_out_channels), num_res_blocks=num_res_blocks,
                             downscale_factor=base.downsample * factors[0], adapter_type="full_adapter")
        return cls(adapter, modalities, base.downsample, level_factors=factors)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "level_factors": self.level_factors}

    # ---- the adapter protocol ------------------------------------------------------------------------
    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> list[torch.Tensor]:
        """Raw maps -> the adapter's features, one ``(B, C_l, h_l, w_l)`` per UNet down block."""
        w = next(self.adapter.parameters())
        H, W = size[0] * self.downsample, size[1] * self.downsample
        image = conditioning_image(self, conditions, present, (H, W), batch_size, w.device, w.dtype)
        features = list(self.adapter(image))
        if self.level_factors is None:
            return features
        sizes = [(size[0] // f, size[1] // f) for f in self.level_factors]
        return [f if tuple(f.shape[-2:]) == s else F.interpolate(f, size=s, mode="bilinear", align_corners=False)
                for f, s in zip(features, sizes)]

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                              state: list[torch.Tensor], strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        features = [scale_residual(f, strength) for f in repeat_batch(state, x_t.shape[0])]
        return base.predict_with_residuals(x_t, t, context, down_intrablock_residuals=features)

    # ---- export ---------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, adapter, cfg: dict) -> "T2IAdapterControl":
        return cls(adapter, cfg["modalities"], cfg.get("downsample", 1), cfg.get("default_strength", 1.0),
                   cfg.get("level_factors"))
