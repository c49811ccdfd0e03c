"""``T2IAdapterModule``: the T2I-Adapter baseline (Mou et al. 2023) trained against the frozen base.

Same data, dropout, logging and checkpoints as ``MCMModule`` (:class:`AdapterModule`); the
adapter's features enter the frozen UNet's down blocks, so gradients flow back through the
frozen UNet into the adapter only.
"""
from __future__ import annotations

from typing import Any

from mcm.models.t2i_adapter import T2IAdapterControl
from mcm.training.adapter_module import AdapterModule


class T2IAdapterModule(AdapterModule):
    """LightningModule holding a frozen base and a trainable T2I-Adapter.

    Args (besides :class:`AdapterModule`'s):
        num_res_blocks: residual blocks per feature level of the adapter (diffusers' default 2).
    """

    adapter_attribute = "adapter"
    config_key = "t2i_adapter_config"
    param_key = "t2i_adapter"

    def __init__(self, num_res_blocks: int = 2, **kwargs: Any):
        super().__init__(**kwargs)

    def build_adapter(self) -> T2IAdapterControl:
        return T2IAdapterControl.from_base(self.base, self.hparams.modalities or {}, self.hparams.num_res_blocks)

    def checkpoint_config(self) -> dict:
        return {"t2i_adapter": dict(self.adapter.adapter.config), "adapter": self.adapter.config}
