"""A frozen base controlled by adapters, composed (design.md §2, §3).

Per step, the predictor gives: the base alone outside the modulation window or without
controls; one adapter's ``controlled_prediction`` when a single adapter has weight 1; else
the composition of independently trained adapters (MCDM, Nair et al.):

    p_c = p_u + sum_i w_i (p_i - p_u)

with ``p_u`` the base's prediction, computed once per step and shared by every adapter that
modulates it.  The predictor sees the batch the base sees (with guidance the doubled
``[uncond; cond]`` batch), so one adapter call serves both guidance branches.  The sampler and
this file only call the adapter protocol (:mod:`mcm.models.adapter`); they never test a type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from mcm.diffusion.sampling import Generator, Predictor, guided, initial_noise, noise_fraction, sample
from mcm.models.adapter import Adapter


@dataclass
class Control:
    """One adapter with its own conditions (raw maps at image size), composition weight and strength."""

    adapter: Adapter
    conditions: Mapping[str, torch.Tensor]
    weight: float = 1.0
    strength: float | torch.Tensor | None = None  # None: the adapter's default_strength

    @property
    def effective_strength(self) -> float | torch.Tensor:
        return self.adapter.default_strength if self.strength is None else self.strength


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
    """``predict(x, t, context)`` of the base under ``controls``; conditions encoded once, here."""
    T = num_train_timesteps or base.num_train_timesteps
    states = []
    for c in controls:
        B = next(iter(c.conditions.values())).shape[0] if c.conditions else 0
        states.append(c.adapter.encode_conditions(c.conditions, None, size, B) if B else None)
    live = [(c, s) for c, s in zip(controls, states) if s is not None and c.weight != 0]

    def predict(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        cache: list[torch.Tensor] = []

        def base_prediction() -> torch.Tensor:
            if not cache:
                cache.append(base.predict(x, t, context))
            return cache[0]

        if not live or not in_window(noise_fraction(t, T), window):
            return base_prediction()
        if len(live) == 1 and live[0][0].weight == 1.0:  # one adapter alone: its prediction, no extra base call
            c, s = live[0]
            return c.adapter.controlled_prediction(base, x, t, context, s, c.effective_strength, base_prediction)
        p_u = base_prediction()
        out = p_u
        for c, s in live:
            p_i = c.adapter.controlled_prediction(base, x, t, context, s, c.effective_strength, base_prediction)
            out = out + c.weight * (p_i - p_u)
        return out

    return predict


@torch.no_grad()
def controlled_sample(base, controls: Sequence[Control], batch_size: int, size: tuple[int, int] | None = None,
                      prompts: list[str] | None = None, negative_prompt: str | list[str] | None = None,
                      num_inference_steps: int = 50, guidance_scale: float = 1.0,
                      window: tuple[float, float] = (0.0, 1.0), generator: Generator = None, scheduler=None,
                      eta: float = 0.0, latents: torch.Tensor | None = None,
                      callback: Callable | None = None, progress: Callable | None = None) -> torch.Tensor:
    """``x_0`` in model space ``(B, C, h, w)``: the base under ``controls``, with guidance.

    The order of operations (text, noise, timesteps, guidance, step) is that of diffusers'
    ``StableDiffusionPipeline``, so with no controls the result is that pipeline's, seed for seed.
    """
    from diffusers import DDIMScheduler

    scheduler = scheduler or DDIMScheduler.from_config(base.scheduler.config)
    size = tuple(size or base.sample_size)
    context = uncond = None
    if base.is_text_conditional:
        context = base.encode_text(prompts if prompts is not None else [""] * batch_size)
        if guidance_scale > 1.0:
            neg = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch_size
            uncond = base.encode_text(neg)
    if latents is None:
        latents = initial_noise((batch_size, base.latent_channels, *size), generator, base.device,
                                context.dtype if context is not None else torch.float32)
    predict = controlled_predictor(base, controls, size, window, scheduler.config.num_train_timesteps)
    return sample(guided(predict, context, uncond, guidance_scale), latents, scheduler, num_inference_steps,
                  generator, eta, callback, progress)
