"""Sampling with a frozen base modulated by one or more MCMs (design.md §2, §3).

``mcm_sample`` is the plain function behind ``MCMPipeline``: per step, ``p`` from the base
(both guidance branches in one batched call), one batched MCM call per module modulating
both branches, composition across modules ``p_c = p_u + sum_i w_i (p_i - p_u)`` (MCDM),
then guidance, then ``scheduler.step``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from diffusers import DDIMScheduler

from .modulator import MultimodalConditioningModule, modulate
from .sampling import guided, make_noise, sample


@dataclass
class Control:
    """One module with its own conditions and composition weight."""

    module: MultimodalConditioningModule
    conditions: Mapping[str, torch.Tensor]  # raw maps, batched, validated
    weight: float = 1.0
    features: torch.Tensor | None = field(default=None, repr=False)


def in_window(i: int, n: int, window: tuple[float, float]) -> bool:
    """Is step ``i`` of ``n`` inside the modulation window (fractions of the schedule, 0 = noisiest)?"""
    frac = i / max(n, 1)
    return window[0] <= frac < window[1] or (window[1] >= 1.0 and i == n - 1)


def make_modulator(controls: list[Control], strength: float, window: tuple[float, float], num_steps: int,
                   size: tuple[int, int], base=None, context: torch.Tensor | None = None) -> Callable:
    """The ``modulate(x, p, t, i)`` hook of :func:`mcm.sampling.guided` for ``controls``.

    Features do not depend on ``t``: each module's conditions are encoded once here.  A
    single control with weight 1 is exactly plain MCM sampling; weights 0 give the base.
    ControlNet controls (``module.is_controlnet``) give ``p_i`` from ``base`` with their
    residuals, ``context`` being the text embeddings of the batch the hook sees.
    """
    for c in controls:
        B = next(iter(c.conditions.values())).shape[0] if c.conditions else None
        c.features = None if B is None else c.module.encode_conditions(c.conditions, None, size, B)

    def hook(x: torch.Tensor, p: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if not in_window(i, num_steps, window):
            return p
        out = p
        for c in controls:
            if c.features is None or c.weight == 0:
                continue
            reps = x.shape[0] // c.features.shape[0]  # 2 when guidance doubled the batch
            feats = c.features.repeat(reps, 1, 1, 1)
            if getattr(c.module, "is_controlnet", False):
                p_i = c.module.controlled_prediction(base, x, t, context, feats, strength)
            else:
                gamma, beta = c.module.modulation(x, p, t, feats)
                p_i = modulate(p, gamma, beta, strength)
            out = p_i if (len(controls) == 1 and c.weight == 1.0) else out + c.weight * (p_i - p)
        return out

    return hook


@torch.no_grad()
def mcm_sample(base, controls: list[Control], prompts: list[str] | None, batch_size: int,
               size: tuple[int, int] | None = None, num_inference_steps: int = 50, guidance_scale: float = 1.0,
               strength: float = 1.0, window: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None,
               seeds: list[int] | None = None, scheduler=None, callback: Callable[[dict], None] | None = None,
               negative_prompt: str = "") -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1]. ``size`` is in model space (``None``: the base's sample size)."""
    scheduler = scheduler or DDIMScheduler.from_config(base.scheduler.config)
    if size is None:
        s = base.unet.config.sample_size
        size = (s, s) if isinstance(s, int) else tuple(s)
    text = base.encode_text(prompts if prompts is not None else [""] * batch_size) if base.is_text_conditional else None
    uncond = base.encode_text([negative_prompt] * batch_size) if text is not None and guidance_scale != 1.0 else None
    context = torch.cat([uncond, text]) if uncond is not None else text  # what guided() feeds the base
    hook = make_modulator(controls, strength, window, num_inference_steps, size, base, context) if controls else None
    predict = None
    if len(controls) == 1 and controls[0].weight == 1.0 and getattr(controls[0].module, "is_controlnet", False):
        predict, hook = controlnet_predictor(base, controls[0], strength, window, num_inference_steps), None
    noise = make_noise((batch_size, base.latent_channels, *size), generator, base.device, seeds)
    x0 = sample(guided(base, text, uncond, guidance_scale, hook, predict), noise, scheduler, num_inference_steps,
                generator, callback)
    return (base.decode(x0) + 1) / 2


def controlnet_predictor(base, control: Control, strength: float, window: tuple[float, float], num_steps: int
                         ) -> Callable:
    """``predict(x, t, emb, i)`` for :func:`mcm.sampling.guided`: one ControlNet alone, no separate base call."""

    def predict(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None, i: int) -> torch.Tensor:
        if control.features is None or not in_window(i, num_steps, window):
            return base.predict(x, t, emb)
        feats = control.features.repeat(x.shape[0] // control.features.shape[0], 1, 1, 1)
        return control.module.controlled_prediction(base, x, t, emb, feats, strength)

    return predict


@torch.no_grad()
def comparison_grid(base, module: MultimodalConditioningModule, batch: dict, n: int = 8, steps: int = 25,
                    guidance_scale: float = 1.0, seed: int = 0, strength: float = 1.0) -> torch.Tensor:
    """Rows: each condition's visualisation, then the base alone, then base + MCM (same seeds) at ``strength``."""
    n = min(n, batch["image"].shape[0])
    conds = {k: batch[k][:n].to(base.device) for k in module.modality_names if k in batch}
    prompts = list(batch["caption"][:n]) if base.is_text_conditional and "caption" in batch else None
    seeds = [seed + i for i in range(n)]
    was_training = module.training
    module.eval()
    plain = mcm_sample(base, [], prompts, n, num_inference_steps=steps, guidance_scale=guidance_scale, seeds=seeds)
    ctrl = mcm_sample(base, [Control(module, conds)], prompts, n, num_inference_steps=steps,
                      guidance_scale=guidance_scale, seeds=seeds, strength=strength)
    module.train(was_training)
    rows = [module.plugins[k].visualize(v).cpu() for k, v in conds.items()]
    size = plain.shape[-2:]
    rows = [torch.nn.functional.interpolate(r, size=size, mode="nearest") for r in rows]
    return torch.cat(rows + [plain.cpu(), ctrl.cpu()])
