"""``FrozenBase``: a pretrained diffusers model that adapters control but never train.

One interface per base family (docs/families.md): ``encode_context`` (prompts or class labels) and
``uncond_context`` (the guidance branch), ``predict(x_t, t, context)`` in the family's prediction
type, ``encode_images`` / ``decode``, and facts (sizes, channels, hash).  This class is the SD 1.x /
2.x family (latent, CLIP text) and the pixel UNets (``shapes32``, unconditional ``UNet2DModel``);
``base_sdxl.py``, ``base_dit.py`` and ``base_sd3.py`` subclass it.  ``FrozenBase.from_pretrained(dir)``
reads the directory and picks the family.  The built-in name ``shapes32`` resolves to the base
shipped inside this package.  Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from mcm.models.base_loading import (BUILTIN_BASES, WEIGHTS_DIR, _cast, _load_component, vae_downsample,  # noqa: F401
                                     denoiser_weights_deferred, is_skeleton, load_denoiser, load_optional,
                                     resolve_base_path)
from mcm.models.families import denoiser_config, detect_family, family_of_denoiser, get_family

log = logging.getLogger(__name__)


def cat_contexts(a, b):
    """``[a; b]`` on the batch axis for a context that is a tensor or a dict of tensors (SDXL, SD3)."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def classifier_free_guidance(p_u: torch.Tensor, p_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``p_u + w (p_c - p_u)``."""
    return p_u + guidance_scale * (p_c - p_u)


class FrozenBaseError(RuntimeError):
    """Someone tried to train the frozen base."""


class BaseMismatchError(ValueError):
    """A checkpoint or export made for one base is being used with another."""


def check_base(expected: dict | None, base: "FrozenBase", force: bool, what: str) -> None:
    """Refuse (clearly) to pair an adapter with a base other than the one it was trained on."""
    if not expected or force:
        return
    if expected.get("hash") and expected["hash"] != base.content_hash():
        raise BaseMismatchError(
            f"{what} was trained on base '{expected.get('source')}' (sha256 {expected['hash'][:12]}...) but the loaded "
            f"base '{base.source}' has sha256 {base.content_hash()[:12]}...; load the matching base, or pass "
            f"force_base=True to use it anyway")


class FrozenBase(nn.Module):
    """The frozen diffusion model ``f(x_t, t, y)``: eval mode, no gradients, never optimised.

    ``predict`` returns what the scheduler's ``prediction_type`` says (epsilon, v or sample).
    Its parameters are deliberately hidden from ``.parameters()`` so they cannot reach an
    optimizer or DDP by accident; ``frozen_parameters()`` lists them for inspection.
    """

    family = "sd"
    #: extra components a family has beyond unet, scheduler, vae, text_encoder, tokenizer
    extra_component_names: tuple[str, ...] = ()
    #: the adapter kind (mcm.models.adapter_kinds) of the family's ControlNet baseline where it is not diffusers'
    #: ``ControlNetModel.from_unet`` (a transformer family's own ControlNet class), and why a family has none
    controlnet_kind: str | None = None
    no_controlnet_reason: str = ""
    #: the prompt-encoding arguments of the family's pipeline that ``MCMPipeline`` passes on (``prompt_options``)
    prompt_option_names: tuple[str, ...] = ()
    #: transformer ``sample_size`` -> the name of diffusers' aspect-ratio bin table its pipeline samples at with
    #: ``use_resolution_binning`` (PixArt-Σ, Sana); empty: the family's pipeline has no binning
    aspect_ratio_bin_tables: dict[int, str] = {}

    def aspect_ratio_bins(self) -> dict[str, list[float]]:
        """The family pipeline's aspect-ratio bins for this base (``use_resolution_binning``); a clear error where
        it has none."""
        name = self.aspect_ratio_bin_tables.get(int(getattr(self.unet.config, "sample_size", 0) or 0))
        if name is None:
            raise ValueError(f"use_resolution_binning: the {self.family} base '{self.source}' has no aspect-ratio bins "
                             f"(its pipeline bins only for transformer sample sizes "
                             f"{sorted(self.aspect_ratio_bin_tables) or 'none'}); pass use_resolution_binning=False")
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha, pipeline_pixart_sigma
        from diffusers.pipelines.sana import pipeline_sana

        for module in (pipeline_pixart_sigma, pipeline_pixart_alpha, pipeline_sana):
            if hasattr(module, name):
                return getattr(module, name)
        raise ValueError(f"use_resolution_binning: diffusers has no table {name}")

    def __init__(self, unet: nn.Module, scheduler, vae: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, tokenizer=None, source: str | None = None, **extra):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder  # unet: the denoiser (UNet or transformer)
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.source = source
        unknown = sorted(set(extra) - set(self.extra_component_names))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected components {unknown}")
        for name in self.extra_component_names:
            setattr(self, name, extra.get(name))
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        super().train(False)
        self._hash: str | None = None
        self._uncond_cache: dict[tuple, torch.Tensor] = {}
        # where the base lives (.to(device) moves it): a denoiser loaded later goes there
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._run_dtype: torch.dtype | None = None  # the dtype a denoiser loaded later is cast to
        self._expected_hash: str | None = None  # the hash cached shards name, checked when the weights load
        self._prompt_options: dict[str, Any] = {}

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, torch_dtype: torch.dtype | None = None,
                        denoiser_weights: bool = True) -> "FrozenBase":
        """Load ``name_or_path`` as the family its directory says; ``torch_dtype`` casts the weights after loading.

        The content hash is taken before the cast, so checkpoints made with the base in bf16/fp16
        match the same base loaded in fp32 (and vice versa).

        ``denoiser_weights=False``: the denoiser is built from its config only (no weight file is read; training
        from cached predictions needs nothing more); :meth:`load_denoiser_weights` loads them when something
        runs it.  The other components load as usual and stay in fp32 until then (the hash covers them all).
        """
        path = resolve_base_path(name_or_path)
        klass = get_family(detect_family(path))
        if denoiser_weights:
            parts = klass.load_components(path)
        else:
            with denoiser_weights_deferred():
                parts = klass.load_components(path)
        base = klass(**parts, source=str(name_or_path))
        log.info("loaded base %s (%s family, %s%s, %s, %.1fM params)", name_or_path, klass.family,
                 type(base.unet).__name__, "" if denoiser_weights else " from its config, weights not read",
                 "latent" if base.vae is not None else "pixel", sum(p.numel() for p in base.unet.parameters()) / 1e6)
        base._run_dtype = torch_dtype
        if torch_dtype is not None and denoiser_weights:
            base.content_hash()  # of the weights as loaded, independent of the dtype they run in
            for m in base.children():
                _cast(m, torch_dtype)
        return base

    @classmethod
    def load_components(cls, path: Path) -> dict:
        """The family's components from a directory (``FrozenBase(**components)``)."""
        parts = {"unet": load_denoiser(path, "unet"),
                 "scheduler": _load_component(path, "scheduler", "diffusers", None),
                 "vae": load_optional(path, "vae", "diffusers")}
        if (path / "text_encoder").is_dir() and not (path / "tokenizer").is_dir():
            raise FileNotFoundError(f"{path}: text_encoder/ without tokenizer/")
        parts["text_encoder"] = load_optional(path, "text_encoder", "transformers")
        parts["tokenizer"] = load_optional(path, "tokenizer", "transformers")
        return parts

    @classmethod
    def from_components(cls, source: str | None = None, **components) -> "FrozenBase":
        """The family's base over already-loaded components (a pipeline's), picked from their types."""
        den = components.get("unet") if components.get("unet") is not None else components.get("transformer")
        klass = get_family(family_of_denoiser(den))
        keep = {"scheduler", "vae", "text_encoder", "tokenizer", *klass.extra_component_names}
        return klass(den, source=source, **{k: v for k, v in components.items() if k in keep})

    # ---- which directories and denoisers are this family's (the registry asks, mcm.models.families) -----
    #: a family whose denoiser is one diffusers class names it here, and claims what holds that class
    denoiser_class: str | None = None

    @classmethod
    def claims_directory(cls, path: Path) -> bool:
        """``denoiser_class`` if set; else (SD 1.x / 2.x, pixel UNets) a ``unet/`` without SDXL's ``text_time``."""
        found = denoiser_config(path)
        if found is None:
            return False
        if cls.denoiser_class is not None:
            return found[1].get("_class_name") == cls.denoiser_class
        return found[0] == "unet" and found[1].get("addition_embed_type") != "text_time"

    @classmethod
    def claims_denoiser(cls, denoiser: nn.Module) -> bool:
        if cls.denoiser_class is not None:
            return type(denoiser).__name__ == cls.denoiser_class
        return type(denoiser).__name__ in ("UNet2DConditionModel", "UNet2DModel") and \
            getattr(denoiser.config, "addition_embed_type", None) != "text_time"

    # ---- refusing to train ------------------------------------------------------------------
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        raise FrozenBaseError(
            "FrozenBase parameters are frozen and must never be optimised or wrapped by DDP; train an "
            "adapter (MCM or ControlNet) instead. Use frozen_parameters() to inspect them.")

    def named_parameters(self, *args, **kwargs):
        return self.parameters()

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in super().named_parameters())

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenBase":
        if requires_grad:
            self.parameters()  # raises
        return self

    def train(self, mode: bool = True) -> "FrozenBase":
        return super().train(False)  # always eval: no dropout, fixed norms

    # ---- facts about the base ---------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def sample_size(self) -> tuple[int, int]:
        """The model-space size the base was trained at ``(h, w)``."""
        s = self.unet.config.sample_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def downsample(self) -> int:
        """Pixels per model-space pixel: 1 for pixel bases, 8 for Stable Diffusion's VAE."""
        return vae_downsample(self.vae)

    @property
    def is_text_conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def default_guidance_scale(self) -> float:
        """The family pipeline's default ``guidance_scale``: ``StableDiffusionPipeline``'s 7.5 for a latent text
        base; 1.0 (no guidance) for pixel bases, which diffusers samples without it (``DDPMPipeline``)."""
        return 7.5 if self.vae is not None and self.is_text_conditional else 1.0

    @property
    def is_class_conditional(self) -> bool:
        return False

    @property
    def uses_cfg(self) -> bool:
        """Whether ``guidance_scale`` > 1 means classifier-free guidance with an unconditional branch (a
        guidance-distilled base, FLUX.1-dev, takes it as an input instead: :meth:`with_guidance`)."""
        return True

    #: True where the denoiser takes the latents packed 2x2 into tokens (FLUX.1, Qwen-Image): the family's
    #: ``_denoise`` packs and unpacks, so the MCM sees the spatial latent; ``mcm.attach`` refuses such a pipeline
    packs_latents: bool = False

    @property
    def guidance_threshold(self) -> float:
        """Guidance runs for ``guidance_scale`` above this: 1 for classifier-free guidance ``p_u + w (p_c - p_u)``,
        0 where the family's scale counts from 0 (Z-Image's ``p_c + w (p_c - p_u)``)."""
        return 1.0

    @property
    def guidance_needs_negative_prompt(self) -> bool:
        """True where the family's pipeline guides only when a negative prompt is given (Qwen-Image's
        ``true_cfg_scale``); elsewhere the unconditional branch defaults to the empty prompt."""
        return False

    def align_contexts(self, a, b):
        """Two contexts made to fit one batch or one ``torch.where``: unchanged here; a family whose prompts keep
        their own lengths pads both to a common length (``RaggedPromptBase``)."""
        return a, b

    def cat_contexts(self, a, b):
        """``[a; b]``: the unconditional and conditional contexts in one batch (guidance's one call)."""
        return cat_contexts(*self.align_contexts(a, b))

    def combine_guidance(self, p_u: torch.Tensor, p_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The family's guidance rule; classifier-free guidance here."""
        return classifier_free_guidance(p_u, p_c, guidance_scale)

    def with_guidance(self, context, guidance_scale: float):
        """The context a sampling run gives the denoiser for ``guidance_scale`` (unchanged: CFG bases)."""
        return context

    def timestep_kwargs(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int]) -> dict:
        """Extra arguments of ``scheduler.set_timesteps`` the family's pipeline passes (FLUX: sigmas, ``mu``)."""
        return {}

    @property
    def device(self) -> torch.device:
        # the weights' device (a pipeline's components may have been moved before they were wrapped); a denoiser
        # without its weights is on the meta device: then where .to() put the rest
        if self.denoiser_loaded:
            return next(self.unet.parameters()).device
        return self._anchor.device

    # ---- the denoiser's weights, loaded when first needed ----------------------------------------
    @property
    def denoiser_loaded(self) -> bool:
        """Whether the denoiser holds its weights (``from_pretrained(..., denoiser_weights=False)``: not yet)."""
        return not is_skeleton(self.unet)

    def expect_hash(self, content_hash: str) -> None:
        """The hash of this base as cached shards recorded it: what :meth:`content_hash` answers while the
        denoiser's weights are not loaded, checked against the real one when they are."""
        self._expected_hash = content_hash

    def load_denoiser_weights(self) -> None:
        """Load the weights of a denoiser built from its config (a no-op once loaded): hash the base (fp32, as
        loaded), then cast it to the run's dtype and move the denoiser to where the base is."""
        if self.denoiser_loaded:
            return
        path, sub = self.unet.mcm_weights_dir
        try:
            real = _load_component(path, sub, "diffusers", None)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"base '{self.source}': the denoiser's weights in {path / sub} could not be loaded "
                f"({type(e).__name__}: {e}); this run did not need them to train (it reads cached predictions), "
                f"but sampling (validation grids, the alignment callback, export checks) does") from e
        real.requires_grad_(False).eval()
        where = self._anchor.device  # where .to() put the rest of the base
        self.unet = real
        self._hash = None
        own = self.content_hash()
        if self._expected_hash is not None and own != self._expected_hash:
            raise BaseMismatchError(
                f"base '{self.source}': its weights (sha256 {own[:12]}...) are not those of the base the cached "
                f"shards were encoded for (sha256 {self._expected_hash[:12]}...)")
        if self._run_dtype is not None:
            for m in self.children():
                _cast(m, self._run_dtype)
        self.unet.to(where)
        log.info("base %s: denoiser weights loaded from %s", self.source, path / sub)

    def _apply(self, fn, recurse: bool = True):
        # a denoiser without its weights stays on the meta device: .to(device) moves everything else
        if self.denoiser_loaded:
            return super()._apply(fn, recurse)
        modules = self._modules
        self.__dict__["_modules"] = {k: m for k, m in modules.items() if k != "unet"}
        try:
            super()._apply(fn, recurse)
        finally:
            self.__dict__["_modules"] = modules  # the same modules, in their registration order
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.frozen_parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.frozen_parameters())

    def content_hash(self) -> str:
        """sha256 over every tensor of the base (names, shapes, bytes); identifies it in checkpoints.

        While the denoiser's weights are not loaded: the hash cached shards recorded (:meth:`expect_hash`), or
        they are loaded to compute it."""
        if self._hash is None and not self.denoiser_loaded:
            if self._expected_hash is not None:
                return self._expected_hash
            self.load_denoiser_weights()
        if self._hash is None:
            h = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
            self._hash = h.hexdigest()
        return self._hash

    # ---- the three things adapters need -----------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B,3,H,W)`` in [-1, 1] -> model space (identity for pixel bases).

        The VAE posterior's mean (deterministic, draws nothing from torch's RNG), so latents cached by
        ``mcm data encode`` are exactly what training from raw images computes; with ``generator`` a sample
        drawn from the posterior with it (what diffusers' train scripts use).
        """
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mean
        # contiguous: the mean is a view of the encoder's output, and randn_like(x0) follows x0's strides
        return ((z - self.latent_shift) * self.vae.config.scaling_factor).float().contiguous()

    @torch.no_grad()
    def decode(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model space -> images in [-1, 1] (``clamp=False``: as the VAE gives them, for ``VaeImageProcessor``)."""
        if self.vae is None:
            out = x.float()
        else:
            z = x.to(self.vae.dtype) / self.vae.config.scaling_factor + self.latent_shift
            out = self.vae.decode(z).sample.float()
        return out.clamp(-1, 1) if clamp else out

    @property
    def latent_shift(self) -> float:
        """The VAE's ``shift_factor`` (SD3: latents are ``(z - shift) * scale``); 0 elsewhere."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0) if self.vae is not None else 0.0

    # ---- context: what the denoiser is conditioned on, and its unconditional branch ----------------
    @torch.no_grad()
    def encode_context(self, prompts: list[str] | None = None, class_labels=None, batch_size: int = 1,
                       image_size: tuple[int, int] | None = None):
        """The conditioning of ``batch_size`` images: text embeddings here (``None`` for unconditional bases)."""
        if class_labels is not None:
            raise ValueError(f"class_labels: the base '{self.source}' is not class-conditional "
                             f"({'it takes prompts' if self.is_text_conditional else 'it takes no conditioning'})")
        return self.encode_text(prompts if prompts is not None else [""] * batch_size) \
            if self.is_text_conditional else None

    @torch.no_grad()
    def uncond_context(self, batch_size: int, negative_prompt: str | list[str] | None = None,
                       image_size: tuple[int, int] | None = None):
        """The unconditional branch of classifier-free guidance (``None``: the base has no guidance)."""
        if not self.is_text_conditional:
            return None
        neg = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch_size
        return self.encode_text(neg)

    def drop_context(self, context, drop: torch.Tensor, image_size: tuple[int, int] | None = None):
        """``context`` with the rows where ``drop`` (bool ``(B,)``, on the CPU) is set replaced by the unconditional
        branch (caption / class dropout of training).

        ``image_size``: the training images' ``(H, W)``, which the unconditional branch is built for as the
        conditional one is (SDXL's size ``time_ids``; ``uncond_context`` is the one place that builds them), so
        dropped rows get the base predictions that sampling and the prediction cache make for them.
        """
        if context is None or not drop.numpy().any():  # a CPU mask (numpy refuses a device one): no host sync
            return context
        context, uncond = self.align_contexts(context, self.uncond_context(len(drop), image_size=image_size))

        def pick(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return torch.where(drop.to(c.device).view(-1, *[1] * (c.ndim - 1)), u.to(c), c)

        if isinstance(context, dict):  # SDXL / SD3: every entry of the dict, row by row
            return {k: pick(v, uncond[k]) for k, v in context.items()}
        return pick(context, uncond)

    def model_kwargs(self, context) -> dict:
        """The denoiser's keyword arguments for ``context``."""
        if not self.is_text_conditional:
            return {}
        if context is None:
            raise ValueError(f"context: the base '{self.source}' is text-conditional; encode a prompt (\"\" for none)")
        return {"encoder_hidden_states": context.to(self.unet.dtype)}

    @torch.no_grad()
    def encode_text(self, prompts: list[str] | None, batch_size: int | None = None) -> torch.Tensor | None:
        """Prompts -> ``(B, L, D)`` text embeddings; ``None`` for unconditional bases. ``""`` = unconditional."""
        if self.text_encoder is None:
            return None
        if prompts is None:
            prompts = [""] * (batch_size or 1)
        if all(p == "" for p in prompts):  # the unconditional branch is asked for every step: cache it
            key = (len(prompts), str(self.device), tuple(sorted(self._prompt_options.items())))
            if key not in self._uncond_cache:
                self._uncond_cache = {key: self._encode(prompts)}
            return self._uncond_cache[key]
        return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self.device)

    @contextmanager
    def prompt_options(self, **options: Any) -> Iterator["FrozenBase"]:
        """Prompts encoded with the family pipeline's own arguments for the duration (FLUX.2's
        ``max_sequence_length``, ``text_encoder_out_layers``); ``None`` values are left at the family's default."""
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(self.prompt_option_names))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: the {self.family} base '{self.source}' encodes prompts as its "
                             f"pipeline does by default and takes no such argument (it takes "
                             f"{list(self.prompt_option_names) or 'none'})")
        before, self._prompt_options = self._prompt_options, given
        try:
            yield self
        finally:
            self._prompt_options = before

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context=None) -> torch.Tensor:
        """The base's prediction ``p`` (its scheduler's ``prediction_type``), ``(B, C, h, w)`` float32."""
        return self._predict(x_t, t, context)

    def predict_with_residuals(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor | None,
                               down_residuals: tuple[torch.Tensor, ...] | None = None,
                               mid_residual: torch.Tensor | None = None,
                               down_intrablock_residuals: list[torch.Tensor] | None = None,
                               transformer_block_residuals: list[torch.Tensor] | None = None,
                               denoiser_kwargs: dict | None = None) -> torch.Tensor:
        """``p`` with residuals injected into the denoiser: ControlNet's (added to the UNet's skip connections
        and middle block), T2I-Adapter's (added inside the down blocks), an SD3 ControlNet's (added to the
        transformer's blocks) or, in ``denoiser_kwargs``, a family's own (FLUX's ``controlnet_block_samples``).

        Not under ``no_grad``: in training, gradients flow back through the frozen UNet into the
        residuals (Zhang & Agrawala 2023); the base's own parameters have ``requires_grad=False``.
        """
        self.load_denoiser_weights()
        dt = self.unet.dtype
        kwargs = {}
        if down_residuals is not None:
            kwargs["down_block_additional_residuals"] = tuple(r.to(dt) for r in down_residuals)
        if mid_residual is not None:
            kwargs["mid_block_additional_residual"] = mid_residual.to(dt)
        if down_intrablock_residuals is not None:  # the UNet pops from this list: always a fresh one
            kwargs["down_intrablock_additional_residuals"] = [r.to(dt) for r in down_intrablock_residuals]
        if transformer_block_residuals is not None:
            kwargs["block_controlnet_hidden_states"] = [r.to(dt) for r in transformer_block_residuals]
        for k, v in (denoiser_kwargs or {}).items():  # a list of residuals, or a dict by block (Z-Image)
            kwargs[k] = None if v is None else {i: r.to(dt) for i, r in v.items()} if isinstance(v, dict) \
                else [r.to(dt) for r in v]
        return self._predict(x_t, t, text_emb, **kwargs)

    def feature_blocks(self) -> list[nn.Module]:
        """The denoiser blocks whose outputs ``predict_with_features`` returns: a UNet's down blocks, then its
        middle block (an MCM option, ``base_features``: the base's own features of ``x_t``)."""
        unet = self.unet
        if not hasattr(unet, "down_blocks") or getattr(unet, "mid_block", None) is None:
            raise FrozenBaseError(f"base_features: the base's {type(unet).__name__} has no UNet down and middle "
                                  "blocks to read features from; expected a UNet family (shapes32, SD 1/2, SDXL)")
        return [*unet.down_blocks, unet.mid_block]

    def feature_channels(self) -> list[int]:
        """Channels of each ``feature_blocks`` output (a UNet's ``block_out_channels``, then the last again)."""
        self.feature_blocks()  # the clear error for a transformer family
        widths = list(self.unet.config.block_out_channels)
        return widths + [widths[-1]]

    @torch.no_grad()
    def predict_with_features(self, x_t: torch.Tensor, t: torch.Tensor, context=None
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``predict`` and the outputs of ``feature_blocks`` in the same forward (forward hooks: no extra cost)."""
        feats: list[torch.Tensor] = []

        def keep(_module, _inputs, out):
            feats.append((out[0] if isinstance(out, tuple) else out).float())

        handles = [m.register_forward_hook(keep) for m in self.feature_blocks()]
        try:
            p = self._predict(x_t, t, context)
        finally:
            for h in handles:
                h.remove()
        return p, feats

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, context, **extra) -> torch.Tensor:
        self.load_denoiser_weights()  # a no-op unless built from its config alone
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if context is None and self.is_text_conditional:
            context = self.encode_text(None, x_t.shape[0])
        out = self._denoise(x_t.to(self.unet.dtype), t, self.model_kwargs(context), extra)
        if out.shape[1] == 2 * x_t.shape[1]:  # learned-variance models (DiT, IF): keep the mean prediction
            out = out[:, : x_t.shape[1]]
        return out.float()

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        return self.unet(x, t, **kwargs, **extra).sample


def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Tokenize to the tokenizer's max length and take the encoder's last hidden state, with the
    attention mask only where the encoder's config asks for it (``StableDiffusionPipeline.encode_prompt``)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
