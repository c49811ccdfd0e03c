"""ControlNet as an adapter of the frozen base (Zhang & Agrawala, arXiv 2302.05543; docs/concepts.md#baselines).

``ControlNetAdapter`` wraps diffusers' ``ControlNetModel.from_unet(base.unet)`` — a trainable
copy of the base UNet's encoder and middle block whose zero-convolution outputs are added
to the frozen UNet's skip connections — plus the modality plugins that turn raw maps into
its conditioning image: the concatenated ``plugin.to_channels(raw)`` maps at image
resolution, zeros where a modality is absent.  The conditioning embedding downsamples by the
base's factor (none for a pixel base, x8 for Stable Diffusion).

It offers what sampling and the pipeline need from a module (``modality_names``, ``plugins``,
``encode_conditions``) plus ``controlled_prediction``, which the composition hook of
:mod:`mcm.diffusion.control` calls instead of the MCM's modulation.

Exported as a plain diffusers ``ControlNetModel`` directory (``config.json`` + safetensors,
loadable by ``ControlNetModel.from_pretrained``) plus ``mcm_controlnet.json`` (the plugins)
and ``mcm_base.json`` (base source and hash).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from diffusers import ControlNetModel

import modalities as modality_registry

from mcm.models.wrapped_export import WrappedModelExport
from mcm.models.adapter import Adapter, BasePrediction, conditioning_image, repeat_batch, scale_residual

ADAPTER_FILE = "mcm_controlnet.json"
#: diffusers' default (x8, as in the paper's 512 -> 64 encoder); a prefix of it for smaller factors
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def embedding_channels_for(downsample: int) -> tuple[int, ...]:
    """Conditioning-embedding widths with ``log2(downsample)`` stride-2 convs: ``(16,)`` for 1, the default for 8."""
    k = int(math.log2(downsample)) if downsample >= 1 else -1
    if downsample < 1 or 2 ** k != downsample or k >= len(DEFAULT_EMBEDDING_CHANNELS):
        raise ValueError(f"downsample: expected 1, 2, 4 or 8 (the base's VAE factor), got {downsample}")
    return DEFAULT_EMBEDDING_CHANNELS[: k + 1]


class ControlNetAdapter(WrappedModelExport, Adapter):
    """A diffusers ``ControlNetModel`` + the modality plugins that make its conditioning image.

    Args:
        controlnet: the ``ControlNetModel`` (``from_base`` builds it from a base's UNet).
        modalities: plugin name -> options (same as the MCM's and the data module's).
        downsample: the base's model-space downsampling (1 pixel, 8 Stable Diffusion).
        default_strength: the conditioning scale used when sampling with ``strength=None``.
    """

    export_file = ADAPTER_FILE
    wrapped_attribute = "controlnet"
    wrapped_class = ControlNetModel
    export_kind = "ControlNet adapter"
    adapter_key = "controlnet"
    checkpoint_model_key = "controlnet"
    method_name = "ControlNet"

    def __init__(self, controlnet: ControlNetModel, modalities: dict[str, dict[str, Any]], downsample: int = 1,
                 default_strength: float = 1.0):
        super().__init__()
        channels = self.set_modalities(modalities, downsample, default_strength)
        self.controlnet = controlnet
        if controlnet.config.conditioning_channels != channels:
            raise ValueError(f"controlnet: conditioning_channels={controlnet.config.conditioning_channels} but the "
                             f"modalities {self.modality_names} give {channels} channels")

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]],
                  conditioning_embedding_out_channels: tuple[int, ...] | None = None) -> "ControlNetAdapter":
        """``ControlNetModel.from_unet(base.unet)``: encoder + middle block copied from the frozen base."""
        from diffusers import UNet2DConditionModel

        if base.controlnet_kind is not None:  # a transformer family's own ControlNet class, same protocol
            from mcm.models.adapter_kinds import get_adapter_kind

            return get_adapter_kind(base.controlnet_kind).load_class().from_base(base, modalities)
        if not isinstance(base.unet, UNet2DConditionModel):
            other = base.no_controlnet_reason
            raise ValueError(f"base '{base.source}' ({base.family} family, {type(base.unet).__name__}): the ControlNet "
                             f"baseline copies a UNet2DConditionModel's encoder (ControlNetModel.from_unet: SD 1.x/2.x, "
                             f"SDXL){'; ' + other if other else ''}; use an MCM, which controls any denoiser")
        if not base.is_text_conditional:
            raise ValueError(f"base '{base.source}': ControlNet needs a text-conditional base (text_encoder/)")
        if not modalities:
            raise ValueError("modalities: ControlNet needs at least one, e.g. {'segmentation': {'num_classes': 6}}")
        plugins = modality_registry.build_all({n: modalities[n] for n in sorted(modalities)})
        widths = tuple(conditioning_embedding_out_channels or embedding_channels_for(base.downsample))
        if 2 ** (len(widths) - 1) != base.downsample:
            raise ValueError(f"conditioning_embedding_out_channels={widths}: {len(widths) - 1} stride-2 convs "
                             f"downsample x{2 ** (len(widths) - 1)}, but the base '{base.source}' needs "
                             f"x{base.downsample}; pass {int(math.log2(base.downsample)) + 1} widths "
                             f"(or None for the default)")
        controlnet = ControlNetModel.from_unet(
            base.unet, conditioning_embedding_out_channels=widths,
            conditioning_channels=sum(p.channels for p in plugins.values())).float()
        return cls(controlnet, modalities, base.downsample)

    # ---- conditions -> conditioning image ------------------------------------------------------------
    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """Raw maps -> ``(B, sum(channels), H, W)`` at image resolution (``size`` is model space).

        ``present``: ``(B, M)`` in {0, 1} (columns = ``modality_names``) for modality dropout;
        ``None`` = present iff given.  Absent modalities are zeros.
        """
        device, dtype = self.controlnet.conv_in.weight.device, self.controlnet.conv_in.weight.dtype
        H, W = size[0] * self.downsample, size[1] * self.downsample
        return conditioning_image(self, conditions, present, (H, W), batch_size, device, dtype)

    # ---- the control ----------------------------------------------------------------------------------
    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, context, cond: torch.Tensor, scale: float = 1.0,
                  base=None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """ControlNet's zero-conv outputs for the base's skip connections and middle block, times ``scale``.

        ``context``: the base's (text embeddings; SDXL's dict, whose ``added_cond_kwargs`` the ControlNet
        takes too); ``base`` turns it into the denoiser's keyword arguments.
        """
        dt = self.controlnet.dtype
        if base is not None:
            kwargs = {k: ({n: v.to(dt) for n, v in a.items()} if isinstance(a, dict) else a.to(dt))
                      for k, a in base.model_kwargs(context).items()}
        else:
            kwargs = {"encoder_hidden_states": context.to(dt)}
        down, mid = self.controlnet(x_t.to(dt), t, controlnet_cond=cond.to(dt), conditioning_scale=scale,
                                    return_dict=False, **kwargs)
        return down, mid

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                              state: torch.Tensor, strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        """The base's prediction with this ControlNet's residuals added (``strength`` = conditioning scale)."""
        if context is None:
            context = base.encode_context(None, batch_size=x_t.shape[0])
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        down, mid = self.residuals(x_t, t, context, repeat_batch(state, x_t.shape[0]), base=base)
        down = tuple(scale_residual(r, strength) for r in down)  # what diffusers' conditioning_scale does,
        return base.predict_with_residuals(x_t, t, context, down, scale_residual(mid, strength))  # or per pixel

    # ---- export ---------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, controlnet, cfg: dict) -> "ControlNetAdapter":
        return cls(controlnet, cfg["modalities"], cfg.get("downsample", 1), cfg.get("default_strength", 1.0))
