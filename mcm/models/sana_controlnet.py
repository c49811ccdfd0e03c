"""ControlNet for the Sana family: diffusers' ``SanaControlNetModel`` as an adapter.

diffusers has no ``from_transformer`` for it; :meth:`SanaControlNetAdapter.from_base` does what the SD3 and FLUX
ones do: a ``SanaControlNetModel`` of the frozen ``SanaTransformer2DModel``'s sizes with its first blocks (7, the
released Sana ControlNets' depth), patch, time and caption embeddings copied from the base, and its
zero-initialised ``input_block`` and ``controlnet_blocks``; output i is added after the frozen transformer's block
i + 1 (``controlnet_block_samples``), so it has at most one block fewer than the transformer.  The conditioning
enters through the shared patch embedding and the zero-initialised ``input_block`` in latent space
(``mcm.models.latent_controlnet``), where ``SanaControlNetPipeline`` puts the deep-compression autoencoder's latent
of a control image.

The ControlNet takes ``t * timestep_scale`` as the base's transformer does; diffusers' ``SanaControlNetPipeline``
omits the scale, which changes nothing where it is 1 (every Sana ControlNet released) and would feed a ControlNet
a different time than its transformer elsewhere (Sana-Sprint).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import SanaControlNetModel

from mcm.models.adapter import BasePrediction, repeat_batch, scale_tokens
from mcm.models.latent_controlnet import LatentControlNetAdapter

ADAPTER_FILE = "mcm_sana_controlnet.json"


def controlnet_from_transformer(transformer, num_layers: int = 7) -> SanaControlNetModel:
    """A ``SanaControlNetModel`` of ``transformer``'s sizes, its first ``num_layers`` blocks and embeddings copied."""
    cfg = dict(transformer.config)
    if cfg.get("guidance_embeds") or cfg.get("qk_norm"):
        raise ValueError("a Sana ControlNet copies a SanaTransformer2DModel without guidance embeddings or "
                         "qk_norm (Sana 1.0 / 1.5); this transformer has "
                         f"guidance_embeds={cfg.get('guidance_embeds')}, qk_norm={cfg.get('qk_norm')} (Sana-Sprint); "
                         "use an MCM")
    if cfg["num_layers"] < 2:
        raise ValueError(f"a Sana ControlNet's block i is added after the transformer's block i + 1; this "
                         f"SanaTransformer2DModel has {cfg['num_layers']} block, expected at least 2")
    takes = inspect.signature(SanaControlNetModel.__init__).parameters
    controlnet = SanaControlNetModel(**{k: v for k, v in cfg.items() if k in takes and k != "num_layers"},
                                     num_layers=min(num_layers, cfg["num_layers"] - 1))
    own = controlnet.state_dict()
    copied = {k: v for k, v in transformer.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in copied and not k.startswith(("input_block.", "controlnet_blocks."))]
    if missing:
        raise ValueError(f"a Sana ControlNet could not copy {missing[:4]} from the base's transformer")
    controlnet.load_state_dict(copied, strict=False)
    return controlnet


class SanaControlNetAdapter(LatentControlNetAdapter):
    """A diffusers ``SanaControlNetModel`` + the modality plugins that make its latent-size conditioning."""

    export_file = ADAPTER_FILE
    wrapped_class = SanaControlNetModel
    export_kind = "Sana ControlNet adapter"
    adapter_key = "sana_controlnet"

    @classmethod
    def conditioning_width(cls, controlnet: SanaControlNetModel) -> int:
        return controlnet.config.in_channels

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], num_layers: int = 7) -> "SanaControlNetAdapter":
        cls.check_modalities(base, modalities)
        return cls(controlnet_from_transformer(base.unet, num_layers).float(), modalities, base.downsample)

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        context, t, kw = self.step_inputs(base, x_t, t, context)
        dt = self.controlnet.dtype
        blocks = self.controlnet(x_t.to(dt), timestep=t * base.unet.config.timestep_scale,
                                 controlnet_cond=repeat_batch(state, x_t.shape[0]).to(dt), return_dict=False, **kw)[0]
        p = self.controlnet.config.patch_size
        scaled = [scale_tokens(b, strength, (x_t.shape[-2] // p, x_t.shape[-1] // p)) for b in blocks]
        return base.predict_with_residuals(x_t, t, context, denoiser_kwargs={"controlnet_block_samples": scaled})
