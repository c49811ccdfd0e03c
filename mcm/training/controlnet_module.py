"""``ControlNetModule``: the ControlNet baseline trained against the same frozen base (docs/concepts.md#baselines).

Selected by ``class_path: mcm.ControlNetModule`` in an experiment YAML; same data, plugins,
dropout, logging and checkpoints as ``MCMModule`` (:class:`AdapterModule`).  Training is the
ordinary diffusion MSE with ControlNet's residuals added to the frozen UNet: gradients flow back
through the frozen UNet (its parameters stay ``requires_grad=False``) into the ControlNet only.
"""
from __future__ import annotations

from typing import Any

from mcm.models.controlnet import ControlNetAdapter
from mcm.training.adapter_module import AdapterModule


class ControlNetModule(AdapterModule):
    """LightningModule holding a frozen base and a trainable ControlNet (Zhang & Agrawala 2023).

    Args (besides :class:`AdapterModule`'s):
        conditioning_embedding_out_channels: widths of ControlNet's conditioning embedding;
            ``None`` matches the base (``(16,)``: no downsampling for a pixel base, diffusers'
            ``(16, 32, 96, 256)``: x8 for Stable Diffusion).
    """

    adapter_attribute = "adapter"
    config_key = "controlnet_config"
    param_key = "controlnet"

    def __init__(self, conditioning_embedding_out_channels: tuple[int, ...] | None = None, **kwargs: Any):
        super().__init__(**kwargs)

    def build_adapter(self) -> ControlNetAdapter:
        return ControlNetAdapter.from_base(self.base, self.hparams.modalities or {},
                                           self.hparams.conditioning_embedding_out_channels)

    def checkpoint_config(self) -> dict:
        return {"controlnet": dict(self.adapter.controlnet.config), "adapter": self.adapter.config}
