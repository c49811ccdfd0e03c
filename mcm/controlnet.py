"""ControlNet as an adapter of the frozen base (Zhang & Agrawala, arXiv 2302.05543; design.md §4).

``ControlNetAdapter`` wraps diffusers' ``ControlNetModel.from_unet(base.unet)`` — a trainable
copy of the base UNet's encoder and middle block whose zero-convolution outputs are added
to the frozen UNet's skip connections — plus the modality plugins that turn raw maps into
its conditioning image: the concatenated ``plugin.to_channels(raw)`` maps at image
resolution, zeros where a modality is absent.  The conditioning embedding downsamples by the
base's factor (none for a pixel base, x8 for Stable Diffusion).

It offers what sampling and the pipeline need from a module (``modality_names``, ``plugins``,
``encode_conditions``) plus ``controlled_prediction``, which the composition hook of
:mod:`mcm.mcm_sampling` calls instead of the MCM's modulation.

Exported as a plain diffusers ``ControlNetModel`` directory (``config.json`` + safetensors,
loadable by ``ControlNetModel.from_pretrained``) plus ``mcm_controlnet.json`` (the plugins)
and ``mcm_base.json`` (base source and hash).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import ControlNetModel
from torch import nn

import modalities as modality_registry
from modalities import ModalityError

ADAPTER_FILE = "mcm_controlnet.json"
#: diffusers' default (x8, as in the paper's 512 -> 64 encoder); a prefix of it for smaller factors
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def embedding_channels_for(downsample: int) -> tuple[int, ...]:
    """Conditioning-embedding widths with ``log2(downsample)`` stride-2 convs: ``(16,)`` for 1, the default for 8."""
    k = int(math.log2(downsample)) if downsample >= 1 else -1
    if downsample < 1 or 2 ** k != downsample or k >= len(DEFAULT_EMBEDDING_CHANNELS):
        raise ValueError(f"downsample: expected 1, 2, 4 or 8 (the base's VAE factor), got {downsample}")
    return DEFAULT_EMBEDDING_CHANNELS[: k + 1]


class ControlNetAdapter(nn.Module):
    """A diffusers ``ControlNetModel`` + the modality plugins that make its conditioning image.

    Args:
        controlnet: the ``ControlNetModel`` (``from_base`` builds it from a base's UNet).
        modalities: plugin name -> options (same as the MCM's and the data module's).
        downsample: the base's model-space downsampling (1 pixel, 8 Stable Diffusion).
    """

    is_controlnet = True

    def __init__(self, controlnet: ControlNetModel, modalities: dict[str, dict[str, Any]], downsample: int = 1):
        super().__init__()
        if not modalities:
            raise ValueError("modalities: ControlNet needs at least one, e.g. {'segmentation': {'num_classes': 6}}")
        self.controlnet = controlnet
        # sorted: the channel layout of the conditioning image must not depend on the YAML's order
        self.plugins = modality_registry.build_all({n: modalities[n] for n in sorted(modalities)})
        self.modality_names = list(self.plugins)
        self.downsample = downsample
        channels = sum(p.channels for p in self.plugins.values())
        if controlnet.config.conditioning_channels != channels:
            raise ValueError(f"controlnet: conditioning_channels={controlnet.config.conditioning_channels} but the "
                             f"modalities {self.modality_names} give {channels} channels")

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]],
                  conditioning_embedding_out_channels: tuple[int, ...] | None = None) -> "ControlNetAdapter":
        """``ControlNetModel.from_unet(base.unet)``: encoder + middle block copied from the frozen base."""
        from diffusers import UNet2DConditionModel

        if not isinstance(base.unet, UNet2DConditionModel):
            raise ValueError(f"base '{base.source}': ControlNet needs a UNet2DConditionModel base (diffusers' "
                             f"ControlNetModel copies its encoder), got {type(base.unet).__name__}; use an MCM instead")
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

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds the plugins around a saved ``ControlNetModel`` (``mcm_controlnet.json``)."""
        return {"adapter": "controlnet", "modalities": {n: p.config() for n, p in self.plugins.items()},
                "downsample": self.downsample}

    # ---- conditions -> conditioning image ------------------------------------------------------------
    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """Raw maps -> ``(B, sum(channels), H, W)`` at image resolution (``size`` is model space).

        ``present``: ``(B, M)`` in {0, 1} (columns = ``modality_names``) for modality dropout;
        ``None`` = present iff given.  Absent modalities are zeros.
        """
        unknown = sorted(set(conditions) - set(self.modality_names))
        if unknown:
            raise ModalityError(f"this ControlNet was trained on {self.modality_names}; it has no modality {unknown}")
        device, dtype = self.controlnet.conv_in.weight.device, self.controlnet.conv_in.weight.dtype
        H, W = size[0] * self.downsample, size[1] * self.downsample
        maps = []
        for j, (name, plugin) in enumerate(self.plugins.items()):
            if name not in conditions:
                maps.append(torch.zeros(batch_size, plugin.channels, H, W, device=device, dtype=dtype))
                continue
            c = plugin.to_channels(plugin.resize(conditions[name], (H, W))).to(device=device, dtype=dtype)
            if present is not None:
                c = c * present[:, j, None, None, None].to(device=device, dtype=dtype)  # (B, 1, 1, 1)
            maps.append(c)
        return torch.cat(maps, dim=1)

    # ---- the control ----------------------------------------------------------------------------------
    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, cond: torch.Tensor,
                  scale: float = 1.0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """ControlNet's zero-conv outputs for the base's skip connections and middle block, times ``scale``."""
        dt = self.controlnet.dtype
        down, mid = self.controlnet(x_t.to(dt), t, encoder_hidden_states=text_emb.to(dt), controlnet_cond=cond.to(dt),
                                    conditioning_scale=scale, return_dict=False)
        return down, mid

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor | None,
                              cond: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The base's prediction with this ControlNet's residuals added (``scale`` = conditioning scale)."""
        if text_emb is None:
            text_emb = base.encode_text(None, x_t.shape[0])
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        down, mid = self.residuals(x_t, t, text_emb, cond, scale)
        return base.predict_with_residuals(x_t, t, text_emb, down, mid)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- export ---------------------------------------------------------------------------------------
    def save_pretrained(self, out: str | Path, safe_serialization: bool = True) -> Path:
        out = Path(out)
        self.controlnet.save_pretrained(out, safe_serialization=safe_serialization)
        (out / ADAPTER_FILE).write_text(json.dumps(self.config, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ControlNetAdapter":
        path = Path(path)
        if not (path / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"'{path}': no {ADAPTER_FILE}; not an exported ControlNet adapter")
        cfg = json.loads((path / ADAPTER_FILE).read_text())
        controlnet = ControlNetModel.from_pretrained(path, use_safetensors=True)
        return cls(controlnet, cfg["modalities"], cfg.get("downsample", 1))


def is_controlnet_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def adapter_from_checkpoint(ckpt: dict, use_ema: bool = True) -> ControlNetAdapter:
    """Rebuild the adapter from a ``ControlNetModule`` checkpoint (EMA weights if present and ``use_ema``)."""
    cfg = ckpt["controlnet_config"]
    controlnet = ControlNetModel.from_config({k: v for k, v in cfg["controlnet"].items() if not k.startswith("_")})
    adapter = ControlNetAdapter(controlnet, cfg["adapter"]["modalities"], cfg["adapter"].get("downsample", 1))
    state = {k.removeprefix("adapter."): v for k, v in ckpt["state_dict"].items() if k.startswith("adapter.")}
    adapter.load_state_dict(state, strict=True)
    if use_ema and "ema" in ckpt:
        shadow, params = ckpt["ema"]["shadow_params"], list(adapter.parameters())
        if len(shadow) != len(params):
            raise ValueError(f"EMA holds {len(shadow)} tensors but the ControlNet has {len(params)} parameters")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
    return adapter.eval()


def export_controlnet_checkpoint(ckpt: dict, out: str | Path, use_ema: bool = True) -> Path:
    """``mcm export`` for a ControlNet run: ControlNetModel dir + ``mcm_controlnet.json`` + ``mcm_base.json``."""
    from .pipeline import save_module

    adapter = adapter_from_checkpoint(ckpt, use_ema)
    info = dict(ckpt.get("mcm_base", {}))
    info["global_step"] = ckpt.get("global_step")
    info["adapter"] = "controlnet"
    return save_module(adapter, out, info)
