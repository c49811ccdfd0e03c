"""``mcm export CKPT OUT``: the MCM alone (config + safetensors, a few MB), never the base."""
from __future__ import annotations

import argparse
import logging
import pickle
from pathlib import Path

import torch

from .modulator import MultimodalConditioningModule
from .pipeline import save_module

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, loaded without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), str(e)[:200])
        raise ValueError(f"checkpoint '{path}' holds objects other than tensors and plain containers; refusing to "
                         f"unpickle it (torch.load weights_only=True): {why}") from None


def module_from_checkpoint(ckpt: dict, use_ema: bool = True) -> MultimodalConditioningModule:
    """Rebuild the MCM from its config and weights in an ``MCMModule`` checkpoint (EMA weights if present)."""
    if "mcm_config" not in ckpt:
        raise ValueError("this checkpoint was not written by mcm.MCMModule (no 'mcm_config'); nothing to export")
    cfg = {k: v for k, v in ckpt["mcm_config"].items() if not k.startswith("_")}
    module = MultimodalConditioningModule.from_config(cfg)
    state = {k.removeprefix("mcm."): v for k, v in ckpt["state_dict"].items() if k.startswith("mcm.")}
    module.load_state_dict(state, strict=True)
    if use_ema and "ema" in ckpt:
        shadow = ckpt["ema"]["shadow_params"]
        params = list(module.parameters())
        if len(shadow) != len(params):
            raise ValueError(f"EMA holds {len(shadow)} tensors but the MCM has {len(params)} parameters")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
    return module.eval()


def fold_strength(module: MultimodalConditioningModule, strength: float) -> MultimodalConditioningModule:
    """Scale the output layer by ``strength``: ``(gamma, beta) -> s (gamma, beta)``, so sampling the
    result at strength 1 is sampling the original at strength ``s`` (``p + s (p gamma + beta)``), exactly.

    The strength acts like a guidance scale for the spatial conditions (the module's modulation is
    the conditional-minus-unconditional direction); folding ships a module whose default call uses
    the strength measured best, while ``strength=1/s`` at sampling recovers the trained module.
    """
    if not strength > 0:
        raise ValueError(f"--strength: expected a positive number, got {strength}")
    with torch.no_grad():
        module.unet.conv_out.weight.mul_(strength)
        module.unet.conv_out.bias.mul_(strength)
    return module


def export_checkpoint(ckpt_path: str | Path, out: str | Path, use_ema: bool = True,
                      strength: float | None = None) -> Path:
    ckpt = load_checkpoint(ckpt_path)
    if "controlnet_config" in ckpt:  # a ControlNetModule run (the ControlNet baseline)
        if strength is not None:
            raise ValueError(f"{ckpt_path}: --strength folds into an MCM's output layer; this is a ControlNet "
                             f"checkpoint (scale its residuals with the sampler's strength instead)")
        from .controlnet import export_controlnet_checkpoint

        return export_controlnet_checkpoint(ckpt, out, use_ema)
    module = module_from_checkpoint(ckpt, use_ema)
    info = dict(ckpt.get("mcm_base", {}))
    info["global_step"] = ckpt.get("global_step")
    if strength is not None:
        fold_strength(module, strength)
        info["folded_strength"] = strength
    out = save_module(module, out, info)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    log.info("exported MCM (%d parameters, %.1f MB, base %s) to %s", module.num_trainable_parameters(),
             size / 1e6, info.get("source"), out)
    return out


def _run(a: argparse.Namespace) -> int:
    export_checkpoint(a.ckpt, a.out, use_ema=not a.no_ema, strength=a.strength)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export", help="export an MCM (or ControlNet) checkpoint as config.json + safetensors")
    p.add_argument("ckpt", help="Lightning checkpoint of an MCMModule or ControlNetModule run")
    p.add_argument("out", help="output directory")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    p.add_argument("--strength", type=float, default=None,
                   help="fold this modulation strength into the MCM's output layer (recorded in mcm_base.json): "
                        "the export at strength 1 samples like the checkpoint at this strength")
    p.set_defaults(func=_run)
