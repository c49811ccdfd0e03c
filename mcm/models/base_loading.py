"""Reading a base directory: which family it is, and each component with the class its config names.

Nothing is fetched: a path is a local diffusers-layout directory or a built-in name (``shapes32``).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path
from typing import Iterator

import diffusers
import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
BUILTIN_BASES = {"shapes32": WEIGHTS_DIR / "shapes32" / "base"}


def resolve_base_path(name_or_path: str | Path) -> Path:
    """A built-in name (``shapes32``) or a local diffusers directory -> an existing directory."""
    if str(name_or_path) in BUILTIN_BASES:
        path = BUILTIN_BASES[str(name_or_path)]
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"the built-in base '{name_or_path}' is not shipped in this install ({path})")
        return path
    path = Path(name_or_path).expanduser()
    has_denoiser = (path / "unet" / "config.json").is_file() or (path / "transformer" / "config.json").is_file()
    if not has_denoiser or not (path / "scheduler").is_dir():
        raise FileNotFoundError(
            f"base '{name_or_path}': expected a diffusers-layout directory with unet/ or transformer/ and "
            f"scheduler/ (optional vae/, text_encoder/, tokenizer/, text_encoder_2/, ...), or one of the built-in "
            f"names {sorted(BUILTIN_BASES)}")
    return path


def builtin_base_name(name_or_path: str | Path) -> str | None:
    """The built-in name (``shapes32``) a base source refers to, by name or by its directory; ``None`` for others.

    Whatever is shipped for a built-in base (its judges) then applies when it is loaded from a path too."""
    src = str(name_or_path)
    if src in BUILTIN_BASES:
        return src
    try:
        here = Path(src).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((n for n, p in BUILTIN_BASES.items() if Path(p).resolve() == here), None)


def vae_downsample(vae) -> int:
    """Pixels per latent pixel of a diffusers VAE (its pipelines' ``vae_scale_factor``): ``2 ** (levels - 1)`` for
    ``AutoencoderKL`` and Sana's ``AutoencoderDC``, ``2 ** len(temperal_downsample)`` for Qwen-Image's video VAE;
    1 without a VAE."""
    if vae is None:
        return 1
    if hasattr(vae.config, "temperal_downsample"):
        return 2 ** len(vae.config.temperal_downsample)
    if hasattr(vae.config, "encoder_block_out_channels"):  # AutoencoderDC (Sana)
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


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

    if sub.startswith("tokenizer"):  # a processor where the pipeline keeps one (FLUX.2's Pixtral processor)
        auto = transformers.AutoProcessor if (path / sub / "processor_config.json").is_file() \
            else transformers.AutoTokenizer
        return auto.from_pretrained(path / sub)
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




_SKIP_DENOISER_WEIGHTS = contextvars.ContextVar("skip_denoiser_weights", default=False)


@contextlib.contextmanager
def denoiser_weights_deferred() -> Iterator[None]:
    """Inside, :func:`load_denoiser` builds the denoiser from its config alone, its weights left on disk."""
    token = _SKIP_DENOISER_WEIGHTS.set(True)
    try:
        yield
    finally:
        _SKIP_DENOISER_WEIGHTS.reset(token)


def load_denoiser(path: Path, sub: str) -> nn.Module:
    """The denoiser ``path/sub`` (``unet`` or ``transformer``) with its weights; under
    :func:`denoiser_weights_deferred`, a skeleton built from its config on the ``meta`` device (no weight is
    read: training from cached predictions needs its config only), which ``FrozenBase.load_denoiser_weights``
    replaces by the real one when something runs it."""
    if not _SKIP_DENOISER_WEIGHTS.get():
        return _load_component(path, sub, "diffusers", None)
    cfg = json.loads((path / sub / "config.json").read_text())
    cls = getattr(diffusers, cfg.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"{path / sub / 'config.json'}: unknown diffusers class {cfg.get('_class_name')!r}")
    with torch.device("meta"):
        skeleton = cls.from_config(cls.load_config(path / sub))
    skeleton.mcm_weights_dir = (path, sub)  # where the weights are, when they are needed
    return skeleton


def is_skeleton(module: nn.Module) -> bool:
    """A denoiser built by :func:`load_denoiser` without its weights (still on the ``meta`` device)."""
    return getattr(module, "mcm_weights_dir", None) is not None and any(p.is_meta for p in module.parameters())


def load_optional(path: Path, sub: str, library: str):
    """``path/sub`` if it exists (a component an absent-T5 SD3 or a pixel base lacks), else ``None``."""
    return _load_component(path, sub, library, None) if (path / sub).is_dir() else None
