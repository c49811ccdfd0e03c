"""``mcm export CKPT OUT``: the trained adapter alone (config + safetensors, a few MB), never the base.

Works for every adapter LightningModule (MCM, ControlNet, T2I-Adapter): the checkpoint's config
key says which adapter to rebuild.  ``--strength S`` records ``default_strength = S`` in the
export's config (what ``strength=None`` samples at); the weights are the trained ones, never
rescaled (docs/concepts.md#the-mcm).
"""
from __future__ import annotations

import argparse
import logging
import math
import pickle
from pathlib import Path

import torch

from mcm.models.adapter import Adapter
from mcm.models.adapter_kinds import checkpoint_keys, kind_of_checkpoint
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines.module_io import save_module

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, loaded without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), None)
        if why is None:  # not a payload: bytes that are no pickle at all
            raise ValueError(f"checkpoint '{path}' is not a readable torch checkpoint ({str(e).splitlines()[0]}); "
                             f"the file may be truncated or corrupt") from e
        raise ValueError(f"checkpoint '{path}' holds objects other than tensors and plain containers; refusing to "
                         f"unpickle it (torch.load weights_only=True): {why}") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # a cut zip archive, random bytes
        raise ValueError(f"checkpoint '{path}' is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else e!r}); the file may be truncated or corrupt "
                         f"(a checkpoint still being written, or copied incompletely)") from e


def copy_ema(module: torch.nn.Module, ema_state: dict, what: str = "checkpoint") -> None:
    """Copy an ``EMAModel.state_dict()``'s shadow parameters into ``module``'s parameters (same order)."""
    shadow, params = ema_state["shadow_params"], list(module.parameters())
    if len(shadow) != len(params):
        raise ValueError(f"{what}: its EMA holds {len(shadow)} tensors but the {type(module).__name__} has "
                         f"{len(params)} parameters; export the raw weights with --no-ema")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            if p.shape != s.shape:
                raise ValueError(f"EMA tensor of shape {tuple(s.shape)} does not fit a parameter of shape "
                                 f"{tuple(p.shape)}")
            p.copy_(s)


def adapter_from_checkpoint(ckpt: dict, use_ema: bool = True, what: str = "checkpoint") -> tuple[Adapter, str]:
    """Rebuild the adapter of an adapter-module checkpoint (EMA weights if present and ``use_ema``);
    ``what`` names the checkpoint in errors."""
    kind = kind_of_checkpoint(ckpt)
    if kind is None:
        raise ValueError(f"{what}: not written by an adapter LightningModule (none of "
                         f"{checkpoint_keys()}); nothing to export")
    key, prefix = kind.checkpoint_key, kind.state_prefix
    module = kind.load_class().from_checkpoint_config(ckpt[key])
    state = {k.removeprefix(prefix): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or shapes:
        raise ValueError(f"{what}: its state_dict does not fit the {type(module).__name__} its '{key}' "
                         f"describes: {len(missing)} missing {[prefix + k for k in missing[:5]]}, {len(extra)} "
                         f"unexpected {[prefix + k for k in extra[:5]]}, {len(shapes)} of another shape "
                         f"{[prefix + k for k in shapes[:5]]}")
    module.load_state_dict(state, strict=True)
    if use_ema and "ema" in ckpt:
        copy_ema(module, ckpt["ema"], what)
    return module.eval(), kind.name


def module_from_checkpoint(ckpt: dict, use_ema: bool = True) -> MultimodalConditioningModule:
    """The MCM of an ``MCMModule`` checkpoint."""
    if "mcm_config" not in ckpt:
        raise ValueError("this checkpoint was not written by mcm.MCMModule (no 'mcm_config'); nothing to export")
    return adapter_from_checkpoint(ckpt, use_ema)[0]


def set_default_strength(module: Adapter, strength: float) -> Adapter:
    """Record ``strength`` as the export's ``default_strength`` (its config), weights untouched."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength <= 0:
        raise ValueError(f"--strength: expected a positive number, got {strength!r}")
    module.default_strength = float(strength)
    if hasattr(module, "register_to_config"):  # the MCM: config.json holds it
        module.register_to_config(default_strength=float(strength))
    return module


def export_checkpoint(ckpt_path: str | Path, out: str | Path, use_ema: bool = True,
                      strength: float | None = None) -> Path:
    ckpt = load_checkpoint(ckpt_path)
    module, kind = adapter_from_checkpoint(ckpt, use_ema, f"checkpoint '{ckpt_path}'")
    info = dict(ckpt.get("mcm_base", {}))
    info["global_step"] = ckpt.get("global_step")
    info["adapter"] = kind
    if strength is not None:
        set_default_strength(module, strength)
    out = save_module(module, out, info)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    log.info("exported %s (%d parameters, %.1f MB, default strength %g, base %s) to %s", kind,
             module.num_trainable_parameters(), size / 1e6, module.default_strength, info.get("source"), out)
    return out


def _run(a: argparse.Namespace) -> int:
    export_checkpoint(a.ckpt, a.out, use_ema=not a.no_ema, strength=a.strength)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export", help="export an MCM / ControlNet / T2I-Adapter checkpoint as config + safetensors")
    p.add_argument("ckpt", help="Lightning checkpoint of an MCMModule, ControlNetModule or T2IAdapterModule run")
    p.add_argument("out", help="output directory")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    p.add_argument("--strength", type=float, default=None,
                   help="record this as the export's default_strength (what strength=None samples at); the "
                        "weights are not changed")
    p.set_defaults(func=_run)
