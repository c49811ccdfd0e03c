"""What the transformer ControlNets share (SD3, FLUX.1, Qwen-Image, Sana, Z-Image): conditioning in *latent* space.

diffusers' ControlNet pipelines for these families VAE-encode an RGB control image and feed the latent (packed 2x2
into tokens where the family packs) to the ControlNet's zero-initialised input embedding.  Our modality maps
(one-hot labels, sketches, depth) are not RGB images, so the concatenated ``plugin.to_channels`` maps are resized
to the latent size (bilinear) and padded with zero channels to the width that embedding takes: what it learns from
is the maps themselves, and for the same latent conditioning the result is the diffusers pipeline's
(tests/test_latent_controlnets.py).  A strength map scales the residual tokens patch by patch (``scale_tokens``).

A subclass says how wide the conditioning is (``conditioning_width``), whether it is packed (``packed``), how to
build the ControlNet from a base (``from_base``) and how to run it (``controlled_prediction``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from mcm.models.adapter import Adapter, conditioning_image
from mcm.models.wrapped_export import WrappedModelExport


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4 C)`` tokens, as FLUX.1's and Qwen-Image's pipelines pack latents."""
    from diffusers import FluxPipeline

    B, C, h, w = x.shape
    return FluxPipeline._pack_latents(x, B, C, h, w)


class LatentControlNetAdapter(WrappedModelExport, Adapter):
    """A diffusers transformer ControlNet + the modality plugins that make its latent-size conditioning.

    Args:
        controlnet: the diffusers ControlNet (``from_base`` builds it from a base's transformer).
        modalities: plugin name -> options.
        downsample: the base's VAE factor (image pixels per latent pixel).
        default_strength: the conditioning scale used when sampling with ``strength=None``.
    """

    wrapped_attribute = "controlnet"
    checkpoint_model_key = "controlnet"
    method_name = "ControlNet"
    #: FLUX.1 / Qwen-Image: the conditioning is packed 2x2 into tokens like the latents
    packed: ClassVar[bool] = False

    def __init__(self, controlnet, modalities: dict[str, dict[str, Any]], downsample: int = 8,
                 default_strength: float = 1.0):
        super().__init__()
        channels = self.set_modalities(modalities, downsample, default_strength)
        self.controlnet = controlnet
        self.cond_channels = self.conditioning_width(controlnet)
        if channels > self.cond_channels:
            raise ValueError(f"controlnet: takes {self.cond_channels} conditioning channels per latent pixel but the "
                             f"modalities {self.modality_names} give {channels}")

    @classmethod
    def conditioning_width(cls, controlnet) -> int:
        """Channels per latent pixel the ControlNet's input embedding takes (before packing)."""
        raise NotImplementedError

    @classmethod
    def check_modalities(cls, base, modalities: dict[str, dict[str, Any]]) -> None:
        """The clear error for maps wider than the latent (before building a ControlNet copy for nothing)."""
        import modalities as modality_registry

        if not modalities:
            raise ValueError(f"modalities: {cls.method_name} needs at least one, e.g. "
                             "{'segmentation': {'num_classes': 6}}")
        channels = sum(p.channels for p in modality_registry.build_all(modalities).values())
        if channels > base.latent_channels:
            name = getattr(base, "display_name", base.family)
            raise ValueError(f"modalities: {sorted(modalities)} give {channels} conditioning channels; a {name} "
                             f"ControlNet takes at most the latent's {base.latent_channels} per pixel"
                             f"{' (packed 2x2)' if cls.packed else ''}")

    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """Raw maps -> ``(B, cond_channels, h, w)`` at the latent size ``size``; packed tokens
        ``(B, h/2 * w/2, 4 cond_channels)`` where the family packs."""
        w = next(self.controlnet.parameters())
        H, W = size[0] * self.downsample, size[1] * self.downsample
        image = conditioning_image(self, conditions, present, (H, W), batch_size, w.device, w.dtype)
        cond = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False) if (H, W) != tuple(size) \
            else image
        cond = F.pad(cond, (0, 0, 0, 0, 0, self.cond_channels - cond.shape[1]))
        return pack_2x2(cond) if self.packed else cond

    def controlnet_kwargs(self, base, context) -> dict:
        """The base's denoiser keyword arguments for ``context`` (prompt embeddings, masks), in the ControlNet's
        dtype."""
        dt = self.controlnet.dtype
        return {k: (v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in base.model_kwargs(context).items()}

    def step_inputs(self, base, x_t: torch.Tensor, t: torch.Tensor, context) -> tuple[Any, torch.Tensor, dict]:
        """The context (the base's unconditional one where ``None``), ``t`` per row of ``x_t`` and the context as
        the denoiser's keyword arguments in the ControlNet's dtype (:meth:`controlnet_kwargs`)."""
        if context is None:
            context = base.encode_context(None, batch_size=x_t.shape[0])
        return context, (t.expand(x_t.shape[0]) if t.ndim == 0 else t), self.controlnet_kwargs(base, context)

    @classmethod
    def from_parts(cls, controlnet, cfg: dict) -> "LatentControlNetAdapter":
        return cls(controlnet, cfg["modalities"], cfg.get("downsample", 8), cfg.get("default_strength", 1.0))
