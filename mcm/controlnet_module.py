"""``ControlNetModule``: the ControlNet baseline trained against the same frozen base (design.md §4).

Selected by ``class_path: mcm.controlnet_module.ControlNetModule`` in an experiment YAML; same
data, plugins, modality dropout, caption dropout, logging and checkpoints as ``MCMModule``.
Training is the ordinary diffusion MSE with ControlNet's residuals added to the frozen UNet:
gradients flow back through the frozen UNet (its parameters stay ``requires_grad=False``)
into the ControlNet only.  The base lives outside the module tree, so only ControlNet
parameters reach the optimizer, DDP and the checkpoint, which records the base's source and
hash and refuses another base unless ``force_base=True``.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from .base_pretraining import diffusion_target
from .controlnet import ControlNetAdapter
from .frozen_base_holder import FrozenBaseHolder
from .grids import log_image_grid
from .mcm_module import MCMModule, adamw, check_base
from .mcm_sampling import comparison_grid

log = logging.getLogger(__name__)


class ControlNetModule(FrozenBaseHolder, L.LightningModule):
    """LightningModule holding a frozen base and a trainable ControlNet (Zhang & Agrawala 2023).

    Args:
        base: built-in base name (``shapes32``) or a diffusers-layout directory with a
            ``UNet2DConditionModel`` (ControlNet copies its encoder).
        modalities: plugin name -> options; the conditioning image is their concatenated
            ``to_channels`` maps at image resolution.
        conditioning_embedding_out_channels: widths of ControlNet's conditioning embedding;
            ``None`` matches the base (``(16,)``: no downsampling for a pixel base, diffusers'
            ``(16, 32, 96, 256)``: x8 for Stable Diffusion).
        lr / weight_decay / warmup_steps: AdamW over the ControlNet, linear warm-up.
        modality_dropout / drop_all_prob: per-sample dropping of each / all modalities (zeros).
        caption_dropout: probability of conditioning on ``""`` instead of the caption.
        ema_decay: keep an EMA of the ControlNet (``None`` = off); used for validation samples and export.
        num_val_samples / val_sample_steps / val_guidance_scale / val_strength: validation and
            prediction grid settings (``val_strength``: the modulation strength of the adapter's row).
        force_base: load checkpoints made for another base anyway.
        base_dtype: run the frozen base in this dtype while the ControlNet trains in fp32.
        channels_last: ``channels_last`` memory format for the frozen UNet and the trainable module.
        compile: ``torch.compile`` both in place (``True`` or a backend name; first steps are slow).
    """

    def __init__(self, base: str = "shapes32", modalities: dict[str, dict[str, Any]] | None = None,
                 conditioning_embedding_out_channels: tuple[int, ...] | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 100, modality_dropout: float = 0.3,
                 drop_all_prob: float = 0.1, caption_dropout: float = 0.3, ema_decay: float | None = None,
                 num_val_samples: int = 8, val_sample_steps: int = 25, val_guidance_scale: float = 1.0,
                 val_strength: float = 1.0,
                 force_base: bool = False, base_dtype: str | None = None,
                 channels_last: bool = False, compile: bool | str = False):
        super().__init__()
        self.save_hyperparameters()
        self._attach_base(base, base_dtype)
        self.adapter = ControlNetAdapter.from_base(self.base, modalities or {}, conditioning_embedding_out_channels)
        self._speed_up(self.adapter, channels_last, compile)
        self.ema = EMAModel(self.adapter.parameters(), decay=ema_decay) if ema_decay else None
        self._val_batch: dict | None = None
        n_cn, n_base = self.adapter.num_trainable_parameters(), self.base.num_parameters()
        self.param_counts = {"controlnet": n_cn, "base": n_base, "ratio": n_cn / n_base}
        log.info("ControlNet %.2fM trainable parameters, base %.2fM frozen: ratio %.1f%%", n_cn / 1e6, n_base / 1e6,
                 100 * n_cn / n_base)

    @property
    def plugins(self):
        return self.adapter.plugins

    @property
    def modality_names(self) -> list[str]:
        return self.adapter.modality_names

    # ---- the training step ------------------------------------------------------------------------
    _text = MCMModule._text  # shared with the MCM: caption dropout -> (B, L, D) text embeddings

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        train = stage == "train"
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        B = images.shape[0]
        # 1. model space and text, once per batch, without gradients
        x0 = self.base.encode_images(images)  # (B, C, h, w)
        text = self._text(batch.get("caption"), B, train)  # (B, L, D)
        # 2. forward process
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.base.num_train_timesteps, (B,), device=self.device)
        x_t = self.base.scheduler.add_noise(x0, noise, t)
        # 3. conditioning image with modality dropout: (B, sum(channels), H, W), zeros where dropped
        conditions = {n: batch[n] for n in self.adapter.modality_names}
        cond = self.adapter.encode_conditions(conditions, self.presence(B, train), tuple(x0.shape[-2:]), B)
        # 4. ControlNet residuals -> frozen UNet; gradients reach the ControlNet through the frozen decoder
        down, mid = self.adapter.residuals(x_t, t, text, cond)
        pred = self.base.predict_with_residuals(x_t, t, text, down, mid)
        # 5. MSE against the scheduler's target (noise or v)
        target = diffusion_target(self.base.scheduler, x0, noise, t)
        loss = F.mse_loss(pred, target)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=not train, batch_size=B,
                 sync_dist=not train)
        if not train:  # the no-op reference: how far the base alone is from the target
            self.log(f"{stage}/base_loss", F.mse_loss(self.base.predict(x_t, t, text), target), on_epoch=True,
                     batch_size=B, sync_dist=True)
        if "skipped" in batch:
            self.log(f"data/{stage}_skipped_samples", batch["skipped"].float().sum(), reduce_fx="sum",
                     on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self._val_batch = batch
        return self._common_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Samples for held-out conditions: base alone and base + ControlNet with the same seeds."""
        h = self.hparams
        grid = comparison_grid(self.base, self.exported_module(), batch, n=batch["image"].shape[0],
                               steps=h.val_sample_steps, guidance_scale=h.val_guidance_scale,
                               seed=batch_idx * 100003, strength=h.val_strength)
        return {"grid": grid, "key": list(batch["key"]),
                "modalities": [n for n in self.adapter.modality_names if n in batch]}

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = adamw(self.adapter.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        counts = {f"params/{k}": float(v) for k, v in self.param_counts.items()}
        for lg in self.loggers:
            lg.log_hyperparams({"params": self.param_counts, "base_source": self.base.source})
            lg.log_metrics(counts, step=0)
        if self.ema is not None:
            self.ema.to(self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, so a step-N checkpoint holds the step-N EMA
            self.ema.step(self.adapter.parameters())

    # ---- checkpoints: the ControlNet and a reference to the base, never the base ---------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mcm_base"] = {"source": self.base.source, "hash": self.base.content_hash()}
        checkpoint["controlnet_config"] = {"controlnet": plain(dict(self.adapter.controlnet.config)),
                                           "adapter": plain(self.adapter.config)}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_base(checkpoint.get("mcm_base"), self.base, self.hparams.force_base, "this checkpoint")
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def exported_module(self) -> ControlNetAdapter:
        """The adapter with EMA weights if EMA is on (a copy), else the live one."""
        if self.ema is None:
            return self.adapter
        m = copy.deepcopy(self.adapter)
        self.ema.copy_to(m.parameters())
        return m

    # ---- validation grid: conditions | base | ControlNet, same seeds ----------------------------------
    def on_validation_epoch_end(self) -> None:
        if self._val_batch is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        h = self.hparams
        grid = comparison_grid(self.base, self.exported_module(), self._val_batch, n=h.num_val_samples,
                               steps=h.val_sample_steps, guidance_scale=h.val_guidance_scale, seed=0,
                               strength=h.val_strength)
        log_image_grid(self, grid, "val/samples", f"step{self.global_step:06d}", nrow=h.num_val_samples)
        self._val_batch = None


def plain(x: Any) -> Any:
    """Configs as plain dicts/lists/scalars, so ``torch.load(weights_only=True)`` reads the checkpoint."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
