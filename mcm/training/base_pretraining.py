"""Pretraining the embedded ``shapes32`` base: a pixel-space, text-conditional diffusers UNet.

The base must know shapes, colours and captions but never see segmentation, sketch or
depth; MCM adds those later.  Speed-ups for a CPU budget: v-prediction (Salimans & Ho
2022) with min-SNR-gamma loss weighting (Hang et al. 2023), cosine noise schedule
(Nichol & Dhariwal 2021), warm-up then a constant learning rate, EMA weights.  10% of
captions are dropped so classifier-free guidance works (Ho & Salimans 2022).
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import lightning as L
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from lightning.pytorch.utilities import rank_zero_only
from transformers import CLIPTextConfig, CLIPTextModel

from mcm.models.frozen_base import FrozenBase, encode_prompts
from mcm.training.image_logging import log_image_grid
from mcm.diffusion.forward_process import diffusion_target, min_snr_weights
from mcm.diffusion.control import sample_base
from mcm.models.text_vocab import build_shapes_tokenizer

log = logging.getLogger(__name__)

PREVIEW_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow ring", "a purple cross",
                   "a red circle and a blue square", "an orange triangle and a cyan ring", ""]


class BasePretrainModule(L.LightningModule):
    """Trains ``UNet2DConditionModel`` + a small ``CLIPTextModel`` on captioned images.

    Args:
        sample_size: image side in pixels.
        block_out_channels: UNet widths per resolution (32, 16, 8 for 32x32 input).
        layers_per_block: resnet blocks per resolution.
        attention_heads: heads of the cross-attention at the lowest resolution only.
        text_hidden: width of the text encoder (= the UNet's cross-attention dim).
        text_layers: transformer layers of the text encoder.
        max_length: tokens per caption (the tokenizer pads/truncates to it).
        prediction_type: ``v_prediction`` or ``epsilon``.
        beta_schedule: diffusers beta schedule name.
        lr: peak AdamW learning rate, reached after ``warmup_steps``.
        min_snr_gamma: min-SNR weighting gamma; 0 disables.
        caption_dropout: share of captions replaced by ``""``.
        ema_decay: EMA decay (with diffusers' warm-up so early steps average quickly).
        preview_every_n_steps: sample a grid with the EMA weights every N steps (0 = never).
        export_dir: at the end of training, write the EMA base as a diffusers directory here.
    """

    def __init__(self, sample_size: int = 32, block_out_channels: tuple[int, ...] = (32, 64, 128),
                 layers_per_block: int = 1, attention_heads: int = 4, text_hidden: int = 64, text_layers: int = 2,
                 max_length: int = 24, prediction_type: str = "v_prediction",
                 beta_schedule: str = "squaredcos_cap_v2", lr: float = 1e-3, warmup_steps: int = 500,
                 weight_decay: float = 0.0, min_snr_gamma: float = 5.0, caption_dropout: float = 0.1,
                 ema_decay: float = 0.999, preview_every_n_steps: int = 1000, export_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = build_shapes_tokenizer(max_length)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=self.tokenizer.vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=max_length,
            pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id))
        n = len(block_out_channels)
        self.unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=3, out_channels=3,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=text_hidden, attention_head_dim=attention_heads, norm_num_groups=16)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                       prediction_type=prediction_type, clip_sample=True)
        self.ema = EMAModel(list(self.unet.parameters()) + list(self.text_encoder.parameters()),
                            decay=ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        self._t0 = time.time()

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        x0 = batch["image"]  # (B, 3, H, W) in [-1, 1]
        B = x0.shape[0]
        # 1. captions, 10% dropped to "" so the model also learns p(x)
        captions = list(batch["caption"])
        if stage == "train":
            drop = torch.rand(B) < self.hparams.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        emb = encode_prompts(self.tokenizer, self.text_encoder, captions, self.device)  # (B, L, D)
        # 2. forward process q(x_t | x_0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), device=self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        # 3. predict and weight the per-sample MSE
        pred = self.unet(x_t, t, encoder_hidden_states=emb).sample
        target = diffusion_target(self.scheduler, x0, noise, t)
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        if self.hparams.min_snr_gamma > 0:
            per_sample = per_sample * min_snr_weights(self.scheduler, t, self.hparams.min_snr_gamma)
        loss = per_sample.mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=stage != "train",
                 batch_size=B, sync_dist=stage != "train")
        if "skipped" in batch and stage == "train":
            self.log("data/skipped_samples", batch["skipped"].float().sum(), reduce_fx="sum", on_step=False,
                     on_epoch=True, batch_size=B)
        return loss

    def on_fit_start(self) -> None:
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.ema.to(self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: callbacks (ModelCheckpoint) run before the module's
        # on_train_batch_end, so a step-N checkpoint would hold the EMA of step N-1 and each
        # resume would lose an update; here also accumulated batches count once.
        self.ema.step(list(self.unet.parameters()) + list(self.text_encoder.parameters()))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step
        if step % 100 == 0:
            self.log("train/ema_decay", self.ema.cur_decay_value or 0.0)
            loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
            log.info("step %d  loss %.4f  %.0f s", step, loss, time.time() - self._t0)
        every = self.hparams.preview_every_n_steps
        if every and step > 0 and step % every == 0:
            self.preview()

    def configure_optimizers(self):
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=self.hparams.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- EMA in checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # ---- the EMA model as a FrozenBase ------------------------------------------------------------
    def ema_base(self) -> FrozenBase:
        """A frozen copy of the model with EMA weights (for previews and export)."""
        unet, text = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        self.ema.copy_to(list(unet.parameters()) + list(text.parameters()))
        sched = DDPMScheduler.from_config(self.scheduler.config)
        return FrozenBase(unet, sched, None, text, self.tokenizer, source="pretraining")

    @rank_zero_only
    def preview(self, guidance_scale: float = 3.0, steps: int = 50) -> None:
        base = self.ema_base()
        prompts = [p for p in PREVIEW_PROMPTS for _ in range(2)]
        images = sample_base(base, prompts, steps, guidance_scale, seed=0)
        log_image_grid(self, images, "samples/ema", f"step{self.global_step:06d}", nrow=8)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            export_base(self.ema_base(), self.hparams.export_dir)


def export_base(base: FrozenBase, out: str | Path) -> Path:
    """Write a diffusers-layout directory (safetensors) that ``FrozenBase.from_pretrained`` loads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base.unet.save_pretrained(out / "unet", safe_serialization=True)
    base.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    base.tokenizer.save_pretrained(out / "tokenizer")
    base.scheduler.save_pretrained(out / "scheduler")
    log.info("exported base to %s", out)
    return out
