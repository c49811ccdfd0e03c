"""``FrozenBase``: a pretrained diffusers model that MCM and ControlNet control but never train.

Loads a diffusers-layout directory (``unet/``, ``scheduler/``, optional ``vae/``,
``text_encoder/`` + ``tokenizer/``), pixel or latent, text-conditional or not; Stable
Diffusion 1.x/2.x directories load unchanged.  The built-in name ``shapes32`` resolves to
the base shipped inside this package.  Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import diffusers
import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
BUILTIN_BASES = {"shapes32": WEIGHTS_DIR / "shapes32" / "base"}


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


def resolve_base_path(name_or_path: str | Path) -> Path:
    """A built-in name (``shapes32``) or a local diffusers directory -> an existing directory."""
    if str(name_or_path) in BUILTIN_BASES:
        path = BUILTIN_BASES[str(name_or_path)]
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"the built-in base '{name_or_path}' is not shipped in this install ({path})")
        return path
    path = Path(name_or_path).expanduser()
    if not (path / "unet" / "config.json").is_file() or not (path / "scheduler").is_dir():
        raise FileNotFoundError(
            f"base '{name_or_path}': expected a diffusers-layout directory with unet/ and scheduler/ "
            f"(optional vae/, text_encoder/, tokenizer/), or one of the built-in names {sorted(BUILTIN_BASES)}")
    return path


def _load_component(path: Path, sub: str, library: str, dtype: torch.dtype | None):
    """Load ``path/sub`` with the class its config names (``_class_name``), from ``library``."""
    cfg_file = next((path / sub / f for f in ("config.json", "scheduler_config.json", "tokenizer_config.json")
                     if (path / sub / f).is_file()), None)
    if cfg_file is None:
        raise FileNotFoundError(f"{path / sub}: no config.json / scheduler_config.json / tokenizer_config.json")
    cfg = json.loads(cfg_file.read_text())
    if library == "diffusers":
        cls = getattr(diffusers, cfg.get("_class_name", ""), None)
        if cls is None:
            raise ValueError(f"{cfg_file}: unknown diffusers class {cfg.get('_class_name')!r}")
        kw = {"torch_dtype": dtype} if dtype is not None and sub != "scheduler" else {}
        return cls.from_pretrained(path / sub, **kw)
    import transformers

    if sub == "tokenizer":
        return transformers.AutoTokenizer.from_pretrained(path / sub)
    arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(path / sub, **({"dtype": dtype} if dtype is not None else {}))


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating weights to ``dtype`` in place, except submodules the library keeps in fp32
    (``_keep_in_fp32_modules``, what ``from_pretrained(torch_dtype=...)`` would respect)."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not keep & set(name.split(".")):
            t.data = t.data.to(dtype)


class FrozenBase(nn.Module):
    """The frozen diffusion model ``f(x_t, t, y)``: eval mode, no gradients, never optimised.

    ``predict`` returns what the scheduler's ``prediction_type`` says (epsilon, v or sample).
    Its parameters are deliberately hidden from ``.parameters()`` so they cannot reach an
    optimizer or DDP by accident; ``frozen_parameters()`` lists them for inspection.
    """

    def __init__(self, unet: nn.Module, scheduler, vae: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, tokenizer=None, source: str | None = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.source = source
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        super().train(False)
        self._hash: str | None = None
        self._uncond_cache: dict[tuple, torch.Tensor] = {}

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, torch_dtype: torch.dtype | None = None) -> "FrozenBase":
        """Load ``name_or_path``; ``torch_dtype`` casts the weights after loading.

        The content hash is taken before the cast, so checkpoints made with the base in bf16/fp16
        match the same base loaded in fp32 (and vice versa).
        """
        path = resolve_base_path(name_or_path)
        unet = _load_component(path, "unet", "diffusers", None)
        scheduler = _load_component(path, "scheduler", "diffusers", None)
        vae = _load_component(path, "vae", "diffusers", None) if (path / "vae").is_dir() else None
        text_encoder = tokenizer = None
        if (path / "text_encoder").is_dir():
            if not (path / "tokenizer").is_dir():
                raise FileNotFoundError(f"{path}: text_encoder/ without tokenizer/")
            text_encoder = _load_component(path, "text_encoder", "transformers", None)
            tokenizer = _load_component(path, "tokenizer", "transformers", None)
        log.info("loaded base %s (%s, %s, %.1fM params)", name_or_path, type(unet).__name__,
                 "latent" if vae is not None else "pixel", sum(p.numel() for p in unet.parameters()) / 1e6)
        base = cls(unet, scheduler, vae, text_encoder, tokenizer, source=str(name_or_path))
        if torch_dtype is not None:
            base.content_hash()  # of the weights as loaded, independent of the dtype they run in
            for m in (unet, vae, text_encoder):
                if m is not None:
                    _cast(m, torch_dtype)
        return base

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
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def is_text_conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def device(self) -> torch.device:
        return next(self.frozen_parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.frozen_parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.frozen_parameters())

    def content_hash(self) -> str:
        """sha256 over every tensor of the base (names, shapes, bytes); identifies it in checkpoints."""
        if self._hash is None:
            h = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            self._hash = h.hexdigest()
        return self._hash

    # ---- the three things adapters need -----------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B,3,H,W)`` in [-1, 1] -> model space (identity for pixel bases)."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.sample(generator) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model space -> images in [-1, 1] (``clamp=False``: as the VAE gives them, for ``VaeImageProcessor``)."""
        if self.vae is None:
            out = x.float()
        else:
            out = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return out.clamp(-1, 1) if clamp else out

    @torch.no_grad()
    def encode_text(self, prompts: list[str] | None, batch_size: int | None = None) -> torch.Tensor | None:
        """Prompts -> ``(B, L, D)`` text embeddings; ``None`` for unconditional bases. ``""`` = unconditional."""
        if self.text_encoder is None:
            return None
        if prompts is None:
            prompts = [""] * (batch_size or 1)
        if all(p == "" for p in prompts):  # the unconditional branch is asked for every step: cache it
            key = (len(prompts), str(self.device))
            if key not in self._uncond_cache:
                self._uncond_cache = {key: self._encode(prompts)}
            return self._uncond_cache[key]
        return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self.device)

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """The base's prediction ``p`` (its scheduler's ``prediction_type``), ``(B, C, h, w)`` float32."""
        return self._predict(x_t, t, text_emb)

    def predict_with_residuals(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor | None,
                               down_residuals: tuple[torch.Tensor, ...] | None = None,
                               mid_residual: torch.Tensor | None = None,
                               down_intrablock_residuals: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``p`` with residuals injected into the UNet: ControlNet's (added to the skip connections and
        the middle block) or T2I-Adapter's (added inside the down blocks).

        Not under ``no_grad``: in training, gradients flow back through the frozen UNet into the
        residuals (Zhang & Agrawala 2023); the base's own parameters have ``requires_grad=False``.
        """
        dt = self.unet.dtype
        kwargs = {}
        if down_residuals is not None:
            kwargs["down_block_additional_residuals"] = tuple(r.to(dt) for r in down_residuals)
        if mid_residual is not None:
            kwargs["mid_block_additional_residual"] = mid_residual.to(dt)
        if down_intrablock_residuals is not None:  # the UNet pops from this list: always a fresh one
            kwargs["down_intrablock_additional_residuals"] = [r.to(dt) for r in down_intrablock_residuals]
        return self._predict(x_t, t, text_emb, **kwargs)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor | None, **unet_kwargs
                 ) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        x = x_t.to(self.unet.dtype)
        if self.is_text_conditional:
            if text_emb is None:
                text_emb = self.encode_text(None, x_t.shape[0])
            out = self.unet(x, t, encoder_hidden_states=text_emb.to(self.unet.dtype), **unet_kwargs).sample
        else:
            out = self.unet(x, t, **unet_kwargs).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned-variance models: keep the mean prediction
            out = out[:, : x_t.shape[1]]
        return out.float()


def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Tokenize to the tokenizer's max length and take the encoder's last hidden state, with the
    attention mask only where the encoder's config asks for it (``StableDiffusionPipeline.encode_prompt``)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
