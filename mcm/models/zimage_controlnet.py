"""ControlNet for the Z-Image family: diffusers' ``ZImageControlNetModel`` (VACE-style control layers) as an adapter.

The released Z-Image ControlNets (VideoX-Fun's "Z-Image-Turbo-Fun-Controlnet-Union") are control blocks placed at
every 5th transformer layer, each reading the control latent (``control_in_dim`` channels, the latent's own) mixed
into the image tokens, with zero-initialised ``before_proj`` / ``after_proj``; the hint of each place is added to
that transformer layer's unified (image + prompt) tokens (``controlnet_block_samples``, a dict by layer).  The
model *shares* the transformer's timestep, patch and caption embedders and its noise and context refiners by
reference (``ZImageControlNetModel.from_transformer``): a checkpoint holds only the control layers.

Here :meth:`ZImageControlNetAdapter.from_base` builds one for a base: control places every 5th layer, its control
blocks and control noise refiner copied from the transformer's blocks at those places (the ControlNet recipe: a
trainable copy), a fresh control patch embedding.  The shared modules are lent to it for each forward only
(:func:`lent_transformer_modules`), so they never enter its state dict, the optimiser or the export, and the export
is what diffusers' pipeline loads.  Its conditioning is the latent-size maps (``mcm.models.latent_controlnet``),
where ``ZImageControlNetPipeline`` puts a VAE-encoded control image.  Its residuals cover prompt tokens too, so the
strength is a number here, not a map.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from diffusers import ZImageControlNetModel

from mcm.models.adapter import BasePrediction, repeat_batch
from mcm.models.latent_controlnet import LatentControlNetAdapter

ADAPTER_FILE = "mcm_zimage_controlnet.json"
#: what ``ZImageControlNetModel.from_transformer`` takes from the transformer (by reference)
SHARED = ("t_scale", "t_embedder", "all_x_embedder", "cap_embedder", "rope_embedder", "noise_refiner",
          "context_refiner", "x_pad_token", "cap_pad_token")
CONTROL_EVERY = 5  # the released union ControlNet: control blocks at layers 0, 5, ..., 25 of 30


@contextmanager
def lent_transformer_modules(controlnet: ZImageControlNetModel, transformer) -> Iterator[ZImageControlNetModel]:
    """``controlnet`` with the transformer's shared modules attached for the duration (``from_transformer``), then
    detached again, so that they are never part of its parameters or state dict."""
    ZImageControlNetModel.from_transformer(controlnet, transformer)
    try:
        yield controlnet
    finally:
        for name in SHARED:
            setattr(controlnet, name, None)


class ZImageControlNetAdapter(LatentControlNetAdapter):
    """A diffusers ``ZImageControlNetModel`` + the modality plugins that make its latent-size conditioning."""

    export_file = ADAPTER_FILE
    wrapped_class = ZImageControlNetModel
    export_kind = "Z-Image ControlNet adapter"
    adapter_key = "zimage_controlnet"

    def __init__(self, controlnet: ZImageControlNetModel, *args: Any, **kwargs: Any):
        super().__init__(controlnet, *args, **kwargs)
        # diffusers 0.42's ZImageControlNetModel reads this under autograd but never sets it (only
        # enable_gradient_checkpointing does): training would fail on the missing attribute
        if not hasattr(controlnet, "gradient_checkpointing"):
            controlnet.gradient_checkpointing = False

    @classmethod
    def conditioning_width(cls, controlnet: ZImageControlNetModel) -> int:
        return controlnet.config.control_in_dim

    @classmethod
    def from_base(cls, base, modalities: dict[str, dict[str, Any]], control_every: int = CONTROL_EVERY
                  ) -> "ZImageControlNetAdapter":
        cls.check_modalities(base, modalities)
        cfg = base.unet.config
        places = list(range(0, cfg.n_layers, control_every))
        controlnet = ZImageControlNetModel(
            control_layers_places=places, control_in_dim=base.latent_channels,
            all_patch_size=tuple(cfg.all_patch_size), all_f_patch_size=tuple(cfg.all_f_patch_size), dim=cfg.dim,
            n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm)
        for block, place in zip(controlnet.control_layers, places):  # zero projections stay zero: not in the copy
            block.load_state_dict(base.unet.layers[place].state_dict(), strict=False)
        controlnet.control_noise_refiner.load_state_dict(base.unet.noise_refiner.state_dict())
        return cls(controlnet.float(), modalities, base.downsample)

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context, state: torch.Tensor,
                              strength: float | torch.Tensor = 1.0,
                              base_prediction: BasePrediction | None = None) -> torch.Tensor:
        from mcm.models.base_zimage import caption_list

        if isinstance(strength, torch.Tensor):
            if strength.numel() != 1 and not bool((strength == strength.flatten()[0]).all()):
                raise ValueError("strength: the Z-Image ControlNet takes one number per step (its residuals cover "
                                 "the prompt's tokens too), not a map; use an MCM for regional strength")
            strength = float(strength.flatten()[0])
        context, t, _ = self.step_inputs(base, x_t, t, context)
        dt = self.controlnet.dtype
        cond = repeat_batch(state, x_t.shape[0]).to(dt).unsqueeze(2)  # (B, C, 1, h, w): one frame
        with lent_transformer_modules(self.controlnet, base.unet) as controlnet:
            hints = controlnet(list(x_t.to(dt).unsqueeze(2).unbind(0)), (1000 - t.float()) / 1000,
                               caption_list(base.check_context(context), dt), cond, conditioning_scale=strength)
        return base.predict_with_residuals(x_t, t, context, denoiser_kwargs={"controlnet_block_samples": hints})
