"""``MCMModule``: trains an MCM against a frozen base (Ham et al. 2023, §3.2).

The shared step, optimizer, EMA, checkpoint hooks and grids are :class:`AdapterModule`'s;
this file builds the MCM and says how it is checkpointed.
"""
from __future__ import annotations

from typing import Any

from mcm.models.modulator import MultimodalConditioningModule
from mcm.training.adapter_module import AdapterModule
from mcm.training.batch_checks import check_checkpoint_modalities


class MCMModule(AdapterModule):
    """LightningModule holding a frozen base and a trainable MCM.

    Args (besides :class:`AdapterModule`'s):
        block_out_channels / layers_per_block / attention_levels / norm_num_groups: MCM UNet
            (the paper's: (32, 32, 64, 128), 2, (2,), 8).
        base_features: the MCM also reads the frozen base's own down- and middle-block features of ``x_t``
            (``MultimodalConditioningModule``'s ``base_feature_channels``; UNet bases; no cached predictions).
        base_feature_levels: with ``base_features``, also add them at the MCM's own levels
            (``MultimodalConditioningModule``'s ``base_feature_levels``).
        condition_features: the frozen base's own down- and middle-block features of each map drawn as an image
            (a pretrained condition encoder: ``MultimodalConditioningModule``'s ``condition_feature_channels``;
            pixel-space UNet bases; no cached predictions).
    """

    adapter_attribute = "mcm"
    config_key = "mcm_config"
    param_key = "mcm"

    def __init__(self, block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention_levels: tuple[int, ...] = (1,), norm_num_groups: int = 8, lr: float = 3e-4,
                 base_features: bool = False, base_feature_levels: bool = False, condition_features: bool = False,
                 **kwargs: Any):
        super().__init__(lr=lr, **kwargs)

    def build_adapter(self) -> MultimodalConditioningModule:
        h = self.hparams
        return MultimodalConditioningModule(
            latent_channels=self.base.latent_channels, modalities=h.modalities, downsample=self.base.downsample,
            block_out_channels=tuple(h.block_out_channels), layers_per_block=h.layers_per_block,
            attention_levels=tuple(h.attention_levels), norm_num_groups=h.norm_num_groups,
            base_feature_channels=tuple(self.base.feature_channels()) if h.get("base_features") else None,
            base_feature_levels=bool(h.get("base_feature_levels")),
            condition_feature_channels=tuple(self.base.feature_channels()) if h.get("condition_features") else None)

    def checkpoint_config(self) -> dict:
        return dict(self.mcm.config)

    def check_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_modalities(checkpoint.get(self.config_key), self.plugins)
