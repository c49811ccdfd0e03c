"""``AdapterModule``: what every adapter's LightningModule shares (docs/architecture.md).

It holds the frozen base outside the module tree (not a submodule), so the base's parameters
are never in ``.parameters()``: never in the optimizer, DDP's reducer or a checkpoint (which
records the base's source and hash instead).  It does the training step through the adapter
protocol of :mod:`mcm.models.adapter`, the same for MCM, ControlNet and T2I-Adapter:

1. images -> model space, captions -> text embeddings (with caption dropout), no gradients;
2. the base's *training* forward process (:class:`mcm.diffusion.forward_process.ForwardProcess`);
3. conditions -> adapter state with modality dropout;
4. the adapter's controlled prediction (MCM: modulates the no-grad base prediction;
   ControlNet / T2I-Adapter: residuals through the frozen UNet);
5. (weighted) MSE against the target of the base's ``prediction_type``.

Plus optimizer and warm-up (diffusers' ``get_constant_schedule_with_warmup``), EMA, checkpoint
hooks and sample grids.  A subclass builds its adapter (``build_adapter``) and names how its
config goes into checkpoints; nothing else.
"""
from __future__ import annotations

import copy
import logging
import zlib
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel

from mcm.diffusion.forward_process import FlowMatchingProcess, forward_process_for
from mcm.models.adapter import Adapter
from mcm.models.frozen_base import BaseMismatchError, FrozenBase, check_base
from mcm.pipelines.grids import comparison_grid, comparison_labels
from mcm.training.batch_checks import check_training_batch
from mcm.training.image_logging import log_image_grid

log = logging.getLogger(__name__)


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


def plain(x: Any) -> Any:
    """Configs as plain dicts/lists/scalars, so ``torch.load(weights_only=True)`` reads the checkpoint."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)  # e.g. a config's _name_or_path as a pathlib.Path: not loadable with weights_only=True


def resolve_base_dtype(name: str | None, cuda_available: bool) -> torch.dtype | None:
    """``base_dtype`` -> a torch dtype, or ``None`` for the weights' own (fp32): ``"auto"`` is bfloat16 on a GPU."""
    if name == "auto":
        return torch.bfloat16 if cuda_available else None
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"base_dtype: expected auto, float32, bfloat16, float16 or null, got {name!r}")
    return dtype


def evaluation_noise(forward_process, keys: list[str] | None, x0: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``(B, C, h, w)`` and timesteps ``(B,)`` for validation / test, a function of each sample's key.

    One CPU generator per sample, seeded by ``crc32(key)``: the same sample gets the same ``x_t`` in every
    validation, on every rank, in any batch (the loss of the same weights is the same, and the curve is
    not noise), and torch's global generator is not touched (training draws what it would have drawn).
    Without keys the position in the batch stands in.
    """
    B = x0.shape[0]
    keys = [str(k) for k in keys] if keys is not None else [f"#{i}" for i in range(B)]
    gens = [torch.Generator().manual_seed(zlib.crc32(k.encode("utf-8"))) for k in keys]
    t = torch.cat([forward_process.sample_timesteps(1, "cpu", generator=g, uniform=True) for g in gens])
    noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens])
    return noise.to(device=x0.device, dtype=x0.dtype), t.to(x0.device)


class AdapterModule(L.LightningModule):
    """Base LightningModule of an adapter trained against a frozen base.

    The arguments every adapter's module shares are declared here, once; a subclass lists only its own and
    passes the rest on (``def __init__(self, own_arg=..., **kwargs): super().__init__(**kwargs)``: LightningCLI
    follows ``**kwargs`` to this signature, and ``save_hyperparameters`` here records both frames' arguments),
    then implements ``build_adapter``.  Shared arguments:

    Args:
        base: built-in base name (``shapes32``) or a diffusers-layout directory.
        modalities: plugin name -> options (the experiment YAMLs link the data module's).
        lr / weight_decay / warmup_steps: AdamW, constant learning rate after a linear warm-up.
        modality_dropout: per-sample probability of dropping each modality (zeros + presence 0).
        drop_all_prob: per-sample probability of dropping all modalities.
        single_modality_prob: per-sample probability of keeping exactly one modality (chosen uniformly) and
            dropping the others.  A module is often sampled with one map alone, and with independent dropout
            of 0.3 over four modalities a given map is alone in 0.7 x 0.3^3 = 1.9% of samples.
        caption_dropout: probability of conditioning the base on ``""`` instead of the caption.
        ema_decay: keep an EMA of the adapter (``None`` = off); used for grids and export.
        loss_weighting / snr_gamma: ``"none"``, ``"min_snr"`` (Hang et al. 2023) or ``"clamped_snr"`` (min-SNR
            floored at 1: noisy steps keep their weight) and its gamma.
        timestep_sampling: ``"uniform"``, ``"cubic"`` or ``"snr"`` (:mod:`mcm.diffusion.forward_process`).
        map_loss_weight: ``lambda >= 0``: training weighs each pixel's squared error by ``1 + lambda w``, ``w``
            the largest ``loss_weight_map`` of the maps present there (sketch: within 1 px of a stroke),
            normalised to mean 1 per sample; 0 (default): off.  Validation losses stay unweighted.
        num_val_samples / val_sample_steps / val_guidance_scale / val_strength: grid settings
            (``val_guidance_scale=None``: the base family pipeline's default, 1 for pixel bases).
        force_base: load checkpoints made for another base anyway.
        base_dtype: run the frozen base in this dtype (``bfloat16``/``float16``); ``None`` keeps fp32; ``"auto"``
            (the default): bfloat16 where a GPU is visible, fp32 on the CPU (where bf16 is slow and the shapes32
            figures were measured).  The base takes no gradient, so its dtype costs no training stability.
        channels_last / compile: speed options for the frozen UNet and the adapter (in place).
        load_denoiser: ``False``: the frozen denoiser is built from its config and its weights are never read
            unless something samples (validation grids and the alignment callback load them lazily on rank 0, or
            are off with a warning where the files are absent): for runs whose shards all carry cached
            predictions (``mcm data encode --predictions K``), which never run the base.  ``None`` (default):
            ``mcm fit`` chooses ``False`` exactly when every training and validation shard folder holds cached
            predictions, else ``True`` (and in Python, ``True``).
    """

    #: attribute holding the trainable adapter (its state_dict prefix in checkpoints)
    adapter_attribute = "adapter"
    #: checkpoint key of the adapter's config
    config_key = "adapter_config"
    #: name of the adapter's parameter count in ``param_counts`` and the logs
    param_key = "adapter"
    #: training batches of a fit whose values (finite, in range) the step checks; later ones only by their shapes,
    #: with no host synchronisation (the DataModule checks every sample's values where it decodes it).  A step
    #: called outside a Trainer (a hand-made batch) always checks the values.
    value_check_batches = 2

    def __init__(self, base: str = "shapes32", modalities: dict[str, dict[str, Any]] | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 100, modality_dropout: float = 0.3,
                 drop_all_prob: float = 0.1, single_modality_prob: float = 0.0, caption_dropout: float = 0.3,
                 ema_decay: float | None = None, loss_weighting: str = "none", snr_gamma: float = 5.0,
                 timestep_sampling: str = "uniform", map_loss_weight: float = 0.0, num_val_samples: int = 8,
                 val_sample_steps: int = 25, val_guidance_scale: float | None = None, val_strength: float | None = None,
                 force_base: bool = False, base_dtype: str | None = "auto", channels_last: bool = False,
                 compile: bool | str = False, load_denoiser: bool | None = None):
        super().__init__()
        self.save_hyperparameters()  # this signature's arguments and the subclass's own
        self._checked_batches = 0  # training batches whose values the step has checked (value_check_batches)
        self.setup_adapter()

    # ---- construction ------------------------------------------------------------------------------
    def setup_adapter(self) -> None:
        h = self.hparams
        dtype = resolve_base_dtype(h.base_dtype, torch.cuda.is_available())
        object.__setattr__(self, "base", FrozenBase.from_pretrained(h.base, torch_dtype=dtype,
                                                                    denoiser_weights=h.get("load_denoiser") is not False))
        self.forward_process = forward_process_for(self.base.scheduler, h.loss_weighting, h.snr_gamma,
                                                   h.timestep_sampling)
        setattr(self, self.adapter_attribute, self.build_adapter())
        self._speed_up(h.channels_last, h.compile)
        self.ema = EMAModel(self.trainable.parameters(), decay=h.ema_decay) if h.ema_decay else None
        self._val_batch: dict | None = None
        self._no_sampling = False  # set once the denoiser's weights were found missing (sampling_base)
        n_ad, n_base = self.trainable.num_trainable_parameters(), self.base.num_parameters()
        self.param_counts = {self.param_key: n_ad, "base": n_base, "ratio": n_ad / n_base}
        log.info("%s %.2fM trainable parameters, base %.2fM frozen: ratio %.2f%%", type(self.trainable).__name__,
                 n_ad / 1e6, n_base / 1e6, 100 * n_ad / n_base)

    def build_adapter(self) -> Adapter:
        raise NotImplementedError

    @property
    def val_guidance_scale(self) -> float:
        """The grids' and the alignment callback's guidance: ``val_guidance_scale``, else the family's default."""
        g = self.hparams.get("val_guidance_scale")
        return float(g) if g is not None else self.base.default_guidance_scale

    @property
    def trainable(self) -> Adapter:
        """The trained adapter (``self.mcm`` / ``self.trainable`` in the subclasses)."""
        return getattr(self, self.adapter_attribute)

    @property
    def plugins(self):
        return self.trainable.plugins

    @property
    def modality_names(self) -> list[str]:
        return self.trainable.modality_names

    def _speed_up(self, channels_last: bool, compile: bool | str) -> None:
        """``channels_last`` layout and ``torch.compile`` (``True`` or a backend name) for the frozen UNet and the
        adapter; ``nn.Module.compile()`` works in place, so names, ``state_dict``, hash and exports are unchanged."""
        base_too = self.base.denoiser_loaded  # a denoiser without its weights is never run in training
        if channels_last:
            if base_too:
                self.base.unet.to(memory_format=torch.channels_last)
            self.trainable.to(memory_format=torch.channels_last)
        if compile:
            kwargs = {"backend": compile} if isinstance(compile, str) else {}
            if base_too:
                self.base.unet.compile(**kwargs)
            self.trainable.compile(**kwargs)

    def _apply(self, fn, recurse: bool = True):
        # the base is not a submodule (so never trained/checkpointed) but must follow .to(device)
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)
        return self

    # ---- the training step ------------------------------------------------------------------------
    def presence(self, batch_size: int, train: bool) -> torch.Tensor:
        """``(B, M)`` keep-mask: each modality dropped w.p. ``modality_dropout``, or w.p. ``single_modality_prob``
        exactly one kept; then all dropped w.p. ``drop_all_prob``."""
        M = len(self.modality_names)
        if not train:
            return torch.ones(batch_size, M, device=self.device)
        keep = (torch.rand(batch_size, M, device=self.device) >= self.hparams.modality_dropout).float()
        keep_any = (torch.rand(batch_size, 1, device=self.device) >= self.hparams.drop_all_prob).float()
        if self.hparams.single_modality_prob > 0:
            alone = torch.rand(batch_size, 1, device=self.device) < self.hparams.single_modality_prob
            which = torch.randint(0, M, (batch_size,), device=self.device)
            keep = torch.where(alone, F.one_hot(which, M).float(), keep)
        return keep * keep_any

    def map_pixel_weights(self, batch: dict, keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
        """``(B, 1, h, w)`` loss weights ``1 + lambda max_m keep_m w_m`` (model space, mean 1 per sample), or
        ``None`` when ``map_loss_weight`` is 0 or no present map has a ``loss_weight_map``."""
        lam = float(self.hparams.map_loss_weight)
        if lam <= 0:
            return None
        w = None
        for j, (name, plugin) in enumerate(self.plugins.items()):
            m = plugin.loss_weight_map(batch[name])
            if m is None:
                continue
            m = F.adaptive_max_pool2d(m.float(), size) if tuple(m.shape[-2:]) != size else m.float()  # any stroke
            m = m.to(keep.device) * keep[:, j, None, None, None]
            w = m if w is None else torch.maximum(w, m)
        if w is None:
            return None
        w = 1.0 + lam * w
        return w / w.flatten(1).mean(1).view(-1, 1, 1, 1)

    def _context(self, batch: dict, batch_size: int, train: bool):
        """The base's conditioning for the batch, with caption / class dropout to the unconditional branch:
        text embeddings (``text_emb``: precomputed ones), SDXL / SD3 dicts, or DiT class labels."""
        base = self.base
        drop = (torch.rand(batch_size) < self.hparams.caption_dropout) if train else torch.zeros(batch_size, dtype=bool)
        image_size = tuple(batch["image"].shape[-2:])  # both branches are built for the training images' size
        if base.is_class_conditional:
            if "class_label" not in batch:
                raise ValueError(f"batch['class_label']: the base '{base.source}' is class-conditional; the data must "
                                 f"give one integer label per image (shard key 'cls' or json 'class_label')")
            return base.drop_context(base.encode_context(class_labels=batch["class_label"], batch_size=batch_size),
                                     drop)
        if not base.is_text_conditional:
            return None
        if "text_emb" in batch:
            context = batch["text_emb"]
        else:
            captions = list(batch["caption"]) if batch.get("caption") is not None else [""] * batch_size
            context = base.encode_context(captions, batch_size=batch_size, image_size=image_size)
        return base.drop_context(context, drop, image_size)

    def _cached_draw(self, batch: dict, batch_size: int, train: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, target, p)`` from the base's cached predictions (``mcm data encode --predictions K``):
        per sample one of the batch's K draws, uniformly (torch's global RNG: seeded runs repeat; the
        DataModule already keeps one draw per sample, drawn per (seed, epoch, key), so its batches have
        K = 1), and ``pred_uncond``
        for the rows caption dropout sends to the unconditional branch; validation / test take draw 0 (fixed
        per sample like ``evaluation_noise``'s draw, but not the same draw: a validation loss on cached shards
        compares with other runs on cached shards, not with one on raw shards).  The base is not run.
        The cached ``t`` were drawn from the density ``base.json`` names; ``on_fit_start`` checks it against this
        run's forward process (``check_cached_base``)."""
        if not getattr(self.trainable, "uses_base_prediction_only", False):
            raise ValueError(f"batch['pred']: the batch holds cached base predictions, but "
                             f"{type(self.trainable).__name__} cannot train from them: it injects residuals into the "
                             f"base's forward pass, so the base must run on every step with them (and backpropagate "
                             f"through it); only adapters that modulate the base's prediction (MCM) can. Train it "
                             f"on shards encoded without --predictions")
        B, base = batch_size, self.base
        guided = base.is_text_conditional or base.is_class_conditional
        pred = batch["pred"]
        if not (isinstance(pred, torch.Tensor) and pred.ndim == 5 and pred.shape[0] == B and pred.shape[1] >= 1):
            raise ValueError(f"batch['pred']: expected cached predictions (B={B}, K, C, h, w), got "
                             f"{tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__}")
        K, size = pred.shape[1], tuple(s // base.downsample for s in batch["image"].shape[-2:])
        if pred.shape[2] != base.latent_channels or tuple(pred.shape[-2:]) != size:
            raise ValueError(f"batch['pred']: expected ({B}, K, {base.latent_channels}, {size[0]}, {size[1]}) for "
                             f"this base and image size, got {tuple(pred.shape)}; were the shards encoded for "
                             f"another base or image size?")
        needed = ["pred_t", "xt", "target"] + (["pred_uncond"] if guided and train and self.hparams.caption_dropout
                                               else [])
        for name in needed:
            want = (B, K) if name == "pred_t" else tuple(pred.shape)
            got = batch.get(name)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
                raise ValueError(f"batch['{name}']: expected {want} next to batch['pred'] (cached shards from "
                                 f"`mcm data encode --predictions K`), got "
                                 f"{tuple(got.shape) if isinstance(got, torch.Tensor) else got!r}")
        # caption dropout, drawn as _context draws it; then one draw per sample
        drop = (torch.rand(B) < self.hparams.caption_dropout) if train and guided else torch.zeros(B, dtype=torch.bool)
        j = torch.randint(0, K, (B,)) if train else torch.zeros(B, dtype=torch.long)
        any_dropped = bool(drop.numpy().any())  # drawn on the CPU (numpy refuses a device tensor): no host sync
        rows, j, drop = torch.arange(B, device=pred.device), j.to(pred.device), drop.to(pred.device)
        p = pred[rows, j]  # (B, C, h, w)
        if any_dropped:
            p = torch.where(drop.view(-1, 1, 1, 1), batch["pred_uncond"][rows, j], p)
        t = batch["pred_t"][rows, j]  # int64 (variance preserving) or float32 (flow: t = 1000 sigma, never truncated)
        if self._flow and not t.is_floating_point():
            raise ValueError("batch['pred_t']: integer timesteps for a flow-matching base (cached by an older `mcm "
                             "data encode`, which truncated t = 1000 sigma); re-encode the shards")
        return batch["xt"][rows, j], t, batch["target"][rows, j], p

    def _check_values(self, train: bool) -> bool:
        """Whether this step reads the batch's values back to check them (see ``value_check_batches``)."""
        if not train or self._trainer is None:
            return True
        self._checked_batches += 1
        return self._checked_batches <= self.value_check_batches

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        train = stage == "train"
        # 0. clear errors, not UNet shape errors
        check_training_batch(self.plugins, batch, 8 * self.base.downsample, self._check_values(train))
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        B = images.shape[0]
        self.check_batch_base(batch)
        cache: list[torch.Tensor] = []  # the base's p, computed (without a graph) at most once
        if "pred" in batch:
            # 1-2. cached shards with the base's predictions: x_t, t, target and p are read, the base never runs
            #      (nor its VAE and text encoder); the MCM takes no context of its own
            x_t, t, target, p = self._cached_draw(batch, B, train)
            text = None
            cache.append(p)
        else:
            # 1. model space and text, once per batch, without gradients; precomputed "latent" /
            #    "text_emb" entries (cached VAE latents, caption embeddings) skip the VAE / text encoder
            x0 = batch["latent"] if "latent" in batch else self.base.encode_images(images)  # (B, C, h, w)
            text = self._context(batch, B, train)
            # 2. the base's training forward process (variance preserving, whatever its inference scheduler);
            #    validation / test: noise and timestep fixed per sample, seeded by its key (evaluation_noise)
            if train:
                noise = torch.randn_like(x0)
                t = self.forward_process.sample_timesteps(B, x0.device)
            else:
                noise, t = evaluation_noise(self.forward_process, batch.get("key"), x0)
            x_t = self.forward_process.add_noise(x0, noise, t)
            target = self.forward_process.target(x0, noise, t)
        # 3. conditions -> adapter state, with modality dropout
        conditions = {n: batch[n] for n in self.modality_names}
        keep = self.presence(B, train)
        state = self.trainable.encode_conditions(conditions, keep, tuple(x_t.shape[-2:]), B)
        # 4. the controlled prediction; the base's own p is computed (without a graph) only if needed

        def base_prediction() -> torch.Tensor:
            if not cache:
                cache.append(self.base.predict(x_t, t, text))
            return cache[0]

        pred = self.trainable.controlled_prediction(self.base, x_t, t, text, state, 1.0, base_prediction)
        # 5. (weighted) MSE against the target of the base's prediction type (min-SNR weights at the draw's t;
        #    map_loss_weight: per-pixel weights where the present maps say the most)
        pixels = self.map_pixel_weights(batch, keep, tuple(pred.shape[-2:])) if train else None
        loss = self.forward_process.loss(pred, target, t, pixels)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=not train, batch_size=B,
                 sync_dist=not train)
        if not train:  # the no-op reference: how far the base alone is from the target
            # with the loss's own weighting (min-SNR ...), so that the two curves compare
            self.log(f"{stage}/base_loss", self.forward_process.loss(base_prediction(), target, t), on_epoch=True,
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
        """Samples for held-out conditions: base alone and base + adapter with the same seeds.

        ``mcm predict -c X.yaml --ckpt_path CKPT`` writes them with :class:`mcm.training.prediction_writer.SampleWriter`.
        """
        h = self.hparams
        grid = comparison_grid(self.base, self.exported_module(), batch, n=batch["image"].shape[0],
                               steps=h.val_sample_steps, guidance_scale=self.val_guidance_scale,
                               seed=batch_idx * 100003, strength=h.val_strength)
        return {"grid": grid, "key": list(batch["key"]), "modalities": [n for n in self.modality_names if n in batch]}

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = adamw(self.trainable.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=self.hparams.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def setup(self, stage: str) -> None:
        """Without the denoiser's weights (``load_denoiser=False``): the cached shards' record stands in for the
        base's hash (checked against the weights if they are ever loaded)."""
        if self.base.denoiser_loaded or self.hparams.get("force_base", False):
            return
        cached = getattr(getattr(self._trainer, "datamodule", None), "cached_base", None)
        if cached and cached.get("hash"):
            self.base.expect_hash(cached["hash"])

    def sampling_base(self) -> bool:
        """Whether the base can sample (grids, the alignment callback): its denoiser's weights are loaded, or are
        loaded now; ``False``, with one warning, where they cannot be (a base-free run without them)."""
        if self.base.denoiser_loaded:
            return True
        if self._no_sampling:
            return False
        try:
            self.base.load_denoiser_weights()
            return True
        except FileNotFoundError as e:
            self._no_sampling = True
            log.warning("validation grids and alignment are off for this run: %s", e)
            return False

    def on_fit_start(self) -> None:
        self.check_cached_base(getattr(self._trainer, "datamodule", None))
        counts = {f"params/{k}": float(v) for k, v in self.param_counts.items()}
        for lg in self.loggers:
            lg.log_hyperparams({"params": self.param_counts, "base_source": self.base.source})
            lg.log_metrics(counts, step=0)
        if self.ema is not None:
            self.ema.to(self.device)

    @property
    def _flow(self) -> bool:
        return isinstance(self.forward_process, FlowMatchingProcess)

    def check_cached_base(self, datamodule) -> None:
        """Refuse cached shards (``mcm data encode``) made for another base: their latents / embeddings are not
        this base's (``force_base`` trains on them anyway); and cached predictions whose timesteps were drawn
        from another density than this run's forward process draws from."""
        cached = getattr(datamodule, "cached_base", None)
        if not cached:
            return
        self.check_cached_density(cached)
        if self.hparams.get("force_base", False) or cached["hash"] == self.base.content_hash():
            return
        raise BaseMismatchError(
            f"the cached shards in {cached.get('shard_dir')} were encoded for base '{cached.get('source')}' (sha256 "
            f"{cached['hash'][:12]}...) but the model's base is '{self.base.source}' (sha256 "
            f"{self.base.content_hash()[:12]}...); {self._cached_base_fix()}")

    def check_cached_density(self, cached: dict) -> None:
        """The draws of cached predictions stand in for this run's: both must come from one timestep density,
        compared by name.  ``base.json`` files written before the density was recorded drew variance-preserving
        ``t`` uniformly, and truncated flow ``t`` to integers (never usable)."""
        if not cached.get("predictions"):
            return
        legacy = "ddpm/uniform" if not self._flow else "flow timesteps truncated to integers (an older encoder)"
        cached_density = cached.get("timestep_density", legacy)
        own = self.forward_process.timestep_density
        if cached_density != own:
            raise ValueError(
                f"the cached predictions in {cached.get('shard_dir')} were drawn with timestep density "
                f"{cached_density!r} but this run's forward process draws from {own!r} (model.init_args."
                f"timestep_sampling / loss settings); train with the density they were drawn from, on raw shards, "
                f"or re-encode them with `mcm data encode --predictions K`")

    def _cached_base_fix(self) -> str:
        """The ways out of a base mismatch of cached shards, for both checks' errors."""
        return (f"re-encode the shards with mcm data encode --base {self.base.source} SHARDS --out DIR, train on the "
                f"raw shards, or pass model.init_args.force_base=true")

    def check_batch_base(self, batch: dict) -> None:
        """Refuse a batch of cached samples encoded for another base (their ``base_hash.txt``): the check that
        also covers shards read from URLs or ``pipe:``, where no ``base.json`` is found next to them."""
        hashes = batch.get("base_hash")
        if not hashes or self.hparams.get("force_base", False):
            return
        own = self.base.content_hash()
        wrong = [(k, h) for k, h in zip(batch.get("key", ["?"] * len(hashes)), hashes) if h is not None and h != own]
        if wrong:
            key, h = wrong[0]
            raise BaseMismatchError(
                f"{len(wrong)} of {len(hashes)} cached samples of this batch (e.g. '{key}') were encoded for another "
                f"base (sha256 {h[:12]}...) than the model's '{self.base.source}' (sha256 {own[:12]}...); "
                f"{self._cached_base_fix()}")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end, so a step-N checkpoint holds the step-N EMA
        if self.ema is not None:
            self.ema.step(self.trainable.parameters())

    # ---- checkpoints: the adapter and a reference to the base, never the base -----------------------
    def checkpoint_config(self) -> dict:
        """What rebuilds the adapter from a checkpoint (``mcm export``)."""
        raise NotImplementedError

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint whose adapter does not fit this configuration (subclasses add checks)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mcm_base"] = {"source": self.base.source, "hash": self.base.content_hash()}
        checkpoint[self.config_key] = plain(self.checkpoint_config())
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_base(checkpoint.get("mcm_base"), self.base, self.hparams.force_base, "this checkpoint")
        self.check_checkpoint(checkpoint)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def exported_module(self) -> Adapter:
        """The adapter with EMA weights if EMA is on (a copy), else the live one."""
        if self.ema is None:
            return self.trainable
        m = copy.deepcopy(self.trainable)
        self.ema.copy_to(m.parameters())
        return m

    # ---- validation grid: conditions | base | adapter, same seeds ---------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self._val_batch is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if not self.sampling_base():
            self._val_batch = None
            return
        h = self.hparams
        module = self.exported_module()
        grid = comparison_grid(self.base, module, self._val_batch, n=h.num_val_samples,
                               steps=h.val_sample_steps, guidance_scale=self.val_guidance_scale, seed=0,
                               strength=h.val_strength)
        labels = comparison_labels(module, [k for k in module.modality_names if k in self._val_batch], h.val_strength)
        n = min(h.num_val_samples, self._val_batch["image"].shape[0])
        log_image_grid(self, grid, "val/samples", f"step{self.global_step:06d}", nrow=n, row_labels=labels)
        self._val_batch = None
