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

    def __init__(self, base: str = "shapes32", modalities: dict[str, dict[str, Any]] | None = None,
                 num_res_blocks: int = 2, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 100,
                 modality_dropout: float = 0.3, drop_all_prob: float = 0.1, single_modality_prob: float = 0.0,
                 caption_dropout: float = 0.3, ema_decay: float | None = None, loss_weighting: str = "none",
                 snr_gamma: float = 5.0, timestep_sampling: str = "uniform",
                 map_loss_weight: float = 0.0,
                 num_val_samples: int = 8, val_sample_steps: int = 25, val_guidance_scale: float = 1.0,
                 val_strength: float | None = None, force_base: bool = False, base_dtype: str | None = None,
                 channels_last: bool = False, compile: bool | str = False):
        super().__init__()
        self.save_hyperparameters()
        self.setup_adapter()

    def build_adapter(self) -> T2IAdapterControl:
        return T2IAdapterControl.from_base(self.base, self.hparams.modalities or {}, self.hparams.num_res_blocks)

    def checkpoint_config(self) -> dict:
        return {"t2i_adapter": dict(self.adapter.adapter.config), "adapter": self.adapter.config}
