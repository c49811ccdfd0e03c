"""A frozen base controlled by adapters, composed (docs/concepts.md#the-mcm).

Per step, the predictor gives: the base alone outside the modulation window or without
controls; one adapter's ``controlled_prediction`` when a single adapter has weight 1; else
the composition of independently trained adapters (MCDM, Nair et al.):

    p_c = p_u + sum_i w_i (p_i - p_u)

with ``p_u`` the base's prediction, computed once per step and shared by every adapter that
modulates it; with region masks ``p_c = p_u + sum_i w_i R_i (p_i - p_u)``.  Strengths may vary over
space and the schedule (:mod:`mcm.diffusion.strength`).  The predictor sees the batch the base sees (with guidance the doubled
``[uncond; cond]`` batch), so one adapter call serves both guidance branches.  The sampler and
this file only call the adapter protocol (:mod:`mcm.models.adapter`); they never test a type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from mcm.diffusion.sampling import (Generator, Predictor, generators_for, guided, initial_noise, noise_fraction,
                                   sample)
from mcm.diffusion.strength import Strength, strength_at
from mcm.models.adapter import Adapter


@dataclass
class Control:
    """One adapter with its own conditions (raw maps at image size), composition weight, strength and region."""

    adapter: Adapter
    conditions: Mapping[str, torch.Tensor]
    weight: float = 1.0
    strength: float | Strength | None = None  # None: the adapter's default_strength
    region: torch.Tensor | None = None  # (1 or B, 1, h, w) in [0, 1], model space; None: everywhere

    def strength_at(self, fraction: float, batch_size: int, device: torch.device,
                    step: int | None = None) -> float | torch.Tensor:
        s = strength_at(self.adapter.default_strength if self.strength is None else self.strength, fraction,
                        batch_size, step)
        return s.to(device) if isinstance(s, torch.Tensor) else s

    def region_for(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        if self.region is None:
            return None
        r = self.region if self.region.shape[0] == batch_size else self.region.repeat(
            batch_size // self.region.shape[0], 1, 1, 1)
        return r.to(device)


def in_window(fraction: float, window: tuple[float, float]) -> bool:
    """Is the noise fraction ``t / T`` (1 = pure noise) inside ``window = [low, high)``?

    Half-open so that adjacent windows do not overlap and ``(s, s)`` is empty; ``high = 1``
    includes pure noise.  ``(0, 1)`` is every step.
    """
    low, high = window
    return low <= fraction < high or (high >= 1.0 and fraction >= 1.0)


def controlled_predictor(base, controls: Sequence[Control], size: tuple[int, int],
                         window: tuple[float, float] = (0.0, 1.0), num_train_timesteps: int | None = None
                         ) -> Predictor:
    """``predict(x, t, context, step=None, p=None)`` of the base under ``controls``; conditions encoded once, here.

    ``step``: the inference step (per-step schedule lists); ``p``: the base's own prediction when the caller
    already has it, so that only adapters that modulate it (MCM) run."""
    T = num_train_timesteps or base.num_train_timesteps
    states = []
    for c in controls:
        B = next(iter(c.conditions.values())).shape[0] if c.conditions else 0
        states.append(c.adapter.encode_conditions(c.conditions, None, size, B) if B else None)
    live = [(c, s) for c, s in zip(controls, states) if s is not None and c.weight != 0]

    def predict(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, step: int | None = None,
                p: torch.Tensor | None = None) -> torch.Tensor:
        # p: the base's prediction for (x, t, context) when the caller has it already (mcm.attach: the wrapped
        # denoiser's own output); else computed here, at most once
        cache: list[torch.Tensor] = [] if p is None else [p]

        def base_prediction() -> torch.Tensor:
            if not cache:
                cache.append(base.predict(x, t, context))
            return cache[0]

        fraction = noise_fraction(t, T)
        if not live or not in_window(fraction, window):
            return base_prediction()
        B, dev = x.shape[0], x.device
        if len(live) == 1 and live[0][0].weight == 1.0 and live[0][0].region is None:
            c, s = live[0]  # one adapter alone: its prediction, no extra base call
            return c.adapter.controlled_prediction(base, x, t, context, s, c.strength_at(fraction, B, dev, step),
                                                   base_prediction)
        p_u = base_prediction()
        out = p_u
        for c, s in live:
            p_i = c.adapter.controlled_prediction(base, x, t, context, s, c.strength_at(fraction, B, dev, step),
                                                  base_prediction)
            r = c.region_for(B, dev)
            out = out + c.weight * (p_i - p_u) * (1.0 if r is None else r)
        return out

    return predict


@torch.no_grad()
def controlled_sample(base, controls: Sequence[Control], batch_size: int, *, size: tuple[int, int] | None = None,
                      prompts: list[str] | None = None, negative_prompt: str | list[str] | None = None,
                      class_labels=None,
                      num_inference_steps: int = 50, guidance_scale: float = 1.0,
                      window: tuple[float, float] = (0.0, 1.0), generator: Generator = None, scheduler=None,
                      eta: float = 0.0, latents: torch.Tensor | None = None,
                      callback: Callable | None = None, progress: Callable | None = None) -> torch.Tensor:
    """``x_0`` in model space ``(B, C, h, w)``: the base under ``controls``, with guidance.

    The order of operations (text, noise, timesteps, guidance, step) is that of diffusers'
    ``StableDiffusionPipeline``, so with no controls the result is that pipeline's, seed for seed.
    """
    from diffusers import DDIMScheduler

    if scheduler is None:  # DDIM (docs/concepts.md#the-mcm); a flow base keeps its own kind (DDIM has no flow)
        own = type(base.scheduler)
        scheduler = own.from_config(base.scheduler.config) if base.prediction_type == "flow" \
            else DDIMScheduler.from_config(base.scheduler.config)
    size = tuple(size or base.sample_size)
    image_size = (size[0] * base.downsample, size[1] * base.downsample)
    context = base.encode_context(prompts, class_labels, batch_size, image_size)
    # classifier-free guidance with the unconditional branch; a guidance-distilled base (FLUX.1-dev) takes the
    # scale as an input of its own instead (with_guidance), and runs one branch
    cfg = guidance_scale > base.guidance_threshold and base.uses_cfg and (negative_prompt is not None
                                                      or not base.guidance_needs_negative_prompt)
    uncond = base.uncond_context(batch_size, negative_prompt, image_size) if cfg else None
    context = base.with_guidance(context, guidance_scale)
    if latents is None:
        dtype = context.dtype if isinstance(context, torch.Tensor) and context.is_floating_point() else torch.float32
        latents = initial_noise((batch_size, base.latent_channels, *size), generator, base.device, dtype)
    predict = controlled_predictor(base, controls, size, window, scheduler.config.num_train_timesteps)
    return sample(guided(predict, context, uncond, guidance_scale, base.cat_contexts, base.combine_guidance,
                         base.guidance_threshold),
                  latents, scheduler,  # no uncond: one branch
                  num_inference_steps, generator, eta, callback, progress,
                  timestep_kwargs=base.timestep_kwargs(scheduler, num_inference_steps, size))


def sample_base(base, prompts: list[str], steps: int = 50, guidance_scale: float = 3.0, seed: int = 0,
                scheduler=None) -> torch.Tensor:
    """Samples of a frozen base alone for ``prompts`` (DDIM by default), ``(B,3,H,W)`` in [0, 1]: the one loop
    driver, ``controlled_sample``, with no controls; image ``i`` from its own seed ``seed * 100003 + i``."""
    gens = generators_for([seed * 100003 + i for i in range(len(prompts))], None)
    x0 = controlled_sample(base, [], len(prompts), prompts=list(prompts), num_inference_steps=steps,
                           guidance_scale=guidance_scale, generator=gens, scheduler=scheduler)
    return (base.decode(x0) + 1) / 2
