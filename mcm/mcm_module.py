"""``MCMModule``: trains an MCM against a frozen base (Ham et al. 2023, §3.2).

The base lives outside the module tree (``self.base`` is not a submodule): its parameters
are never in ``.parameters()``, so never in the optimizer, DDP's reducer or a checkpoint.
Checkpoints record the base's source and content hash instead and refuse to load onto
another base unless ``force_base=True``.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from .base_pretraining import diffusion_target
from .batch_checks import check_checkpoint_modalities, check_training_batch
from .frozen_base import FrozenBase
from .frozen_base_holder import FrozenBaseHolder
from .grids import log_image_grid
from .mcm_sampling import comparison_grid
from .modulator import MultimodalConditioningModule, modulate

log = logging.getLogger(__name__)


class BaseMismatchError(ValueError):
    """A checkpoint or export made for one base is being used with another."""


def check_base(expected: dict[str, Any] | None, base: FrozenBase, force: bool, what: str) -> None:
    """Refuse (clearly) to pair an MCM with a base other than the one it was trained on."""
    if not expected or force:
        return
    if expected.get("hash") and expected["hash"] != base.content_hash():
        raise BaseMismatchError(
            f"{what} was trained on base '{expected.get('source')}' (sha256 {expected['hash'][:12]}...) but the loaded "
            f"base '{base.source}' has sha256 {base.content_hash()[:12]}...; load the matching base, or pass "
            f"force_base=True to use it anyway")


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) where torch has that kernel for the parameters' device.

    The default per-tensor loop cost 18.6 ms per step for the paper's MCM (340 tensors) on CPU
    against 3.4 ms fused, about 3% of a bf16 SD forward (bench/train_step.py); same update.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # e.g. torch < 2.4 on CPU
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class MCMModule(FrozenBaseHolder, L.LightningModule):
    """LightningModule holding a frozen base and a trainable MCM.

    Args:
        base: built-in base name (``shapes32``) or a diffusers-layout directory.
        modalities: plugin name -> options (the data module should read the same; the
            experiment YAMLs link them with ``${data.init_args.modalities}``).
        block_out_channels / layers_per_block / attention_levels / norm_num_groups: MCM UNet.
        lr: AdamW learning rate after ``warmup_steps``.
        modality_dropout: per-sample probability of dropping each modality (zeros + presence 0).
        drop_all_prob: per-sample probability of dropping all modalities (the module must then
            leave the base alone).
        caption_dropout: probability of conditioning the base on ``""`` instead of the caption,
            so both classifier-free-guidance branches are seen in training.
        ema_decay: keep an EMA of the MCM (``None`` = off); used for validation samples and export.
        num_val_samples / val_sample_steps / val_guidance_scale / val_strength: validation and
            prediction grid settings (``val_strength``: the modulation strength of the adapter's row).
        force_base: load checkpoints made for another base anyway.
        base_dtype: run the frozen base in this dtype (``bfloat16``/``float16``) while the MCM
            trains in fp32; ``None`` keeps fp32.
        channels_last: ``channels_last`` memory format for the frozen UNet and the trainable module.
        compile: ``torch.compile`` both in place (``True`` or a backend name; first steps are slow).
    """

    def __init__(self, base: str = "shapes32", modalities: dict[str, dict[str, Any]] | None = None,
                 block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention_levels: tuple[int, ...] = (1,), norm_num_groups: int = 8, lr: float = 3e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 100, modality_dropout: float = 0.3,
                 drop_all_prob: float = 0.1, caption_dropout: float = 0.3, ema_decay: float | None = None,
                 num_val_samples: int = 8, val_sample_steps: int = 25, val_guidance_scale: float = 1.0,
                 val_strength: float = 1.0,
                 force_base: bool = False, base_dtype: str | None = None,
                 channels_last: bool = False, compile: bool | str = False):
        super().__init__()
        self.save_hyperparameters()
        self._attach_base(base, base_dtype)
        self.mcm = MultimodalConditioningModule(
            latent_channels=self.base.latent_channels, modalities=modalities, downsample=self.base.downsample,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            attention_levels=tuple(attention_levels), norm_num_groups=norm_num_groups)
        self._speed_up(self.mcm, channels_last, compile)
        self.ema = EMAModel(self.mcm.parameters(), decay=ema_decay) if ema_decay else None
        self._val_batch: dict | None = None
        n_mcm, n_base = self.mcm.num_trainable_parameters(), self.base.num_parameters()
        self.param_counts = {"mcm": n_mcm, "base": n_base, "ratio": n_mcm / n_base}
        log.info("MCM %.2fM trainable parameters, base %.2fM frozen: ratio %.2f%%", n_mcm / 1e6, n_base / 1e6,
                 100 * n_mcm / n_base)

    @property
    def plugins(self):
        return self.mcm.plugins

    @property
    def modality_names(self) -> list[str]:
        return self.mcm.modality_names

    # ---- the training step ------------------------------------------------------------------------
    def _text(self, captions: list[str] | None, batch_size: int, train: bool,
              text_emb: torch.Tensor | None = None) -> torch.Tensor | None:
        """Text embeddings ``(B, L, D)`` with caption dropout; ``text_emb`` = precomputed ones of the captions."""
        if not self.base.is_text_conditional:
            return None
        captions = list(captions) if captions is not None else [""] * batch_size
        drop = (torch.rand(batch_size) < self.hparams.caption_dropout).tolist() if train else [False] * batch_size
        if text_emb is None:
            return self.base.encode_text(["" if d else c for c, d in zip(captions, drop)])
        if any(drop):  # dropped rows get the (cached) embedding of ""
            dropped = torch.tensor(drop, device=text_emb.device)[:, None, None]
            text_emb = torch.where(dropped, self.base.encode_text(None, 1).to(text_emb), text_emb)
        return text_emb

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        train = stage == "train"
        check_training_batch(self.plugins, batch, 8 * self.base.downsample)  # 0. clear errors, not UNet shape errors
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        B = images.shape[0]
        # 1. model space and text, once per batch, without gradients; precomputed "latent" /
        #    "text_emb" entries (cached VAE latents, caption embeddings) skip the VAE / text encoder
        x0 = batch["latent"] if "latent" in batch else self.base.encode_images(images)  # (B, C, h, w)
        text = self._text(batch.get("caption"), B, train, batch.get("text_emb"))
        # 2. forward process
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.base.num_train_timesteps, (B,), device=self.device)
        x_t = self.base.scheduler.add_noise(x0, noise, t)
        # 3. frozen prediction p = f(x_t, t, y): no graph, no gradient into the base
        p = self.base.predict(x_t, t, text)
        # 4. modality dropout, modulation p_hat = p (1 + gamma) + beta
        conditions = {n: batch[n] for n in self.mcm.modality_names}
        present = self.presence(B, train)
        gamma, beta = self.mcm(x_t, p, t, conditions, present)
        p_hat = modulate(p, gamma, beta)
        # 5. MSE against the scheduler's target (noise or v)
        target = diffusion_target(self.base.scheduler, x0, noise, t)
        loss = F.mse_loss(p_hat, target)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=not train, batch_size=B,
                 sync_dist=not train)
        if not train:  # the no-op reference: how far the base alone is from the target
            self.log(f"{stage}/base_loss", F.mse_loss(p, target), on_epoch=True, batch_size=B, sync_dist=True)
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
        """Samples for held-out conditions: base alone and base + MCM with the same seeds.

        ``mcm predict -c X.yaml --ckpt_path CKPT`` writes them with :class:`mcm.prediction_writer.SampleWriter`.
        """
        h = self.hparams
        grid = comparison_grid(self.base, self.exported_module(), batch, n=batch["image"].shape[0],
                               steps=h.val_sample_steps, guidance_scale=h.val_guidance_scale,
                               seed=batch_idx * 100003, strength=h.val_strength)
        return {"grid": grid, "key": list(batch["key"]), "modalities": [n for n in self.mcm.modality_names if n in batch]}

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = adamw(self.mcm.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
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
        # here, not in on_train_batch_end, so a step-N checkpoint holds the step-N EMA
        if self.ema is not None:
            self.ema.step(self.mcm.parameters())

    # ---- checkpoints: the MCM and a reference to the base, never the base --------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mcm_base"] = {"source": self.base.source, "hash": self.base.content_hash()}
        checkpoint["mcm_config"] = dict(self.mcm.config)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_base(checkpoint.get("mcm_base"), self.base, self.hparams.force_base, "this checkpoint")
        check_checkpoint_modalities(checkpoint.get("mcm_config"), self.plugins)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def exported_module(self) -> MultimodalConditioningModule:
        """The MCM with EMA weights if EMA is on (a copy), else the live one."""
        if self.ema is None:
            return self.mcm
        import copy

        m = copy.deepcopy(self.mcm)
        self.ema.copy_to(m.parameters())
        return m

    # ---- validation grid: conditions | base | MCM, same seeds --------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self._val_batch is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        h = self.hparams
        grid = comparison_grid(self.base, self.exported_module(), self._val_batch, n=h.num_val_samples,
                               steps=h.val_sample_steps, guidance_scale=h.val_guidance_scale, seed=0,
                               strength=h.val_strength)
        log_image_grid(self, grid, "val/samples", f"step{self.global_step:06d}", nrow=h.num_val_samples)
        self._val_batch = None
