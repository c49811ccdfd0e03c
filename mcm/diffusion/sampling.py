"""The reverse process as plain functions (k-diffusion habit): a denoiser in, samples out.

``sample`` drives any diffusers scheduler exactly as diffusers' own pipelines do
(``StableDiffusionPipeline.__call__``): ``set_timesteps``, noise times ``init_noise_sigma``,
then per timestep ``scale_model_input`` -> denoiser -> ``scheduler.step`` with only the
keyword arguments that scheduler's ``step`` accepts (``eta``, ``generator``;
``prepare_extra_step_kwargs``).  ``guided`` builds the denoiser for a frozen base with
classifier-free guidance (both branches in one batched call) around a ``predict`` function
that may be the base alone or the base controlled by adapters (:mod:`mcm.diffusion.control`).
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from mcm.models.frozen_base import cat_contexts, classifier_free_guidance

#: ``denoise(x, t, step) -> p``: ``step`` is the index of the ``scheduler.step`` this evaluation belongs to
Denoiser = Callable[..., torch.Tensor]
#: ``predict(x, t, context, step=None) -> p`` for a batch (with guidance: the doubled ``[uncond; cond]`` batch)
Predictor = Callable[..., torch.Tensor]
Generator = torch.Generator | list[torch.Generator] | None


def extra_step_kwargs(scheduler, generator: Generator = None, eta: float = 0.0) -> dict:
    """``eta`` / ``generator`` for ``scheduler.step`` where its signature takes them (PNDM, UniPC, Heun don't)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


class StepCounter:
    """Which inference step a model evaluation belongs to, whatever the scheduler.

    Per-step schedules hold one value per inference step, value ``i`` at step ``i``.  Most schedulers make one
    evaluation per step, but a second-order one (Heun, KDPM2, DPM-Solver SDE) makes two, both inside step ``i``
    (``scheduler.state_in_first_order`` is true before the first of them), and PNDM makes four per Runge-Kutta
    warm-up step (``counter % 4``) or, with ``skip_prk_steps``, two for its first PLMS step (``counter == 1`` is
    the correction of step 0).  Ask :meth:`next` just before each evaluation; it reads the scheduler's state at
    that moment, so it works in any loop that calls ``scheduler.step`` once per evaluation (ours, or a diffusers
    pipeline's).
    """

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.calls, self.step = 0, -1

    def _starts_step(self) -> bool:
        s = self.scheduler
        if hasattr(s, "state_in_first_order"):  # Heun, KDPM2(Ancestral), DPMSolverSDE
            return bool(s.state_in_first_order)
        if hasattr(s, "prk_timesteps") and hasattr(s, "counter"):  # PNDM
            if s.config.skip_prk_steps:
                return s.counter != 1
            if s.counter < len(s.prk_timesteps):
                return s.counter % 4 == 0
        return True

    def next(self) -> int:
        """The step index of the evaluation about to run (0 = the noisiest step)."""
        if self.calls == 0 or self._starts_step():
            self.step += 1
        self.calls += 1
        return self.step


def noise_fraction(t: torch.Tensor | float, num_train_timesteps: int) -> float:
    """``t / T``: where a timestep sits on the noise schedule (1 = pure noise), the same for every scheduler."""
    return float(t) / num_train_timesteps


def initial_noise(shape: tuple[int, ...], generator: Generator, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``randn_tensor`` as diffusers' pipelines draw it (one generator per image draws that image's noise)."""
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


def generators_for(seeds: list[int] | None, generator: Generator) -> Generator:
    """Per-image seeds -> one CPU generator per image (each image reproducible whatever its batch)."""
    if seeds is None:
        return generator
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample(denoise: Denoiser, latents: torch.Tensor, scheduler, num_inference_steps: int = 50,
           generator: Generator = None, eta: float = 0.0,
           callback: Callable[[dict], torch.Tensor | None] | None = None,
           progress: Callable | None = None, timestep_kwargs: dict | None = None) -> torch.Tensor:
    """Run the reverse process from ``latents`` ``(B, C, h, w)`` (unit Gaussian noise); returns ``x_0``.

    ``callback({"i": i, "t": t, "x": x})`` runs after each step (a dict, as k-diffusion's samplers give it)
    and may return a replacement for ``x`` (diffusers' ``callback_on_step_end``); ``progress`` wraps the
    timestep iterator (a progress bar); ``timestep_kwargs`` go to ``scheduler.set_timesteps`` (a family's own
    sigmas and shift, ``FrozenBase.timestep_kwargs``).
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive integer, got {num_inference_steps!r}")
    scheduler.set_timesteps(num_inference_steps, device=latents.device, **(timestep_kwargs or {}))
    # flow-matching schedulers (SD3) have neither: their pipelines neither scale the noise nor the input
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", None)
    step_kwargs = extra_step_kwargs(scheduler, generator, eta)
    timesteps = scheduler.timesteps
    steps = StepCounter(scheduler)
    for i, t in enumerate(progress(timesteps) if progress is not None else timesteps):
        p = denoise(scale_input(x, t) if scale_input is not None else x, t, steps.next())
        x = scheduler.step(p, t, x, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            replaced = callback({"i": i, "t": t, "x": x})
            x = x if replaced is None else replaced
    return x


def guided(predict: Predictor, context: torch.Tensor | None, uncond_context: torch.Tensor | None,
           guidance_scale: float = 1.0, cat: Callable = cat_contexts,
           combine: Callable = classifier_free_guidance, threshold: float = 1.0) -> Denoiser:
    """A denoiser with classifier-free guidance (Ho & Salimans 2022): ``p = p_u + w (p_c - p_u)``.

    Guidance is on when ``guidance_scale > threshold`` (1) and there is an unconditional context, as in
    diffusers; then both branches go through ``predict`` as one batched call ``[uncond; cond]``,
    so adapters modulate both branches in one call too (docs/concepts.md#the-mcm).
    ``cat`` / ``combine``: the family's batching of the two contexts and its guidance rule
    (``FrozenBase.cat_contexts`` / ``combine_guidance``; Qwen-Image pads its prompts and renormalises).
    """
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number (1 = no guidance), got {guidance_scale!r}")
    use_cfg = guidance_scale > threshold and uncond_context is not None

    def denoise(x: torch.Tensor, t: torch.Tensor, step: int | None = None) -> torch.Tensor:
        if not use_cfg:
            return predict(x, t, context, step=step)
        p_u, p_c = predict(torch.cat([x, x]), t, cat(uncond_context, context), step=step).chunk(2)
        return combine(p_u, p_c, guidance_scale)

    return denoise
