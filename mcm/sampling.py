"""Sampling loops as plain functions (k-diffusion habit): a denoiser in, samples out.

``sample`` drives any diffusers scheduler (DDIM by default in the pipeline).  The denoiser
``denoise(x, t, i) -> p`` returns the (possibly guided, possibly modulated) prediction in
the scheduler's ``prediction_type``; ``guided`` builds one for a ``FrozenBase`` with
classifier-free guidance, both branches in one batched call, and an optional
``modulate(x, p, t, i)`` hook applied to both branches at once (MCM, design.md §2).
"""
from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Modulator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def sample(denoise: Denoiser, noise: torch.Tensor, scheduler, num_inference_steps: int = 50,
           generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Run the reverse process from ``noise`` ``(B, C, h, w)``; returns the final ``x_0`` in model space."""
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        p = denoise(scheduler.scale_model_input(x, t), t, i)
        x = scheduler.step(p, t, x, generator=generator).prev_sample
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "p": p})
    return x


def guided(base, text_emb: torch.Tensor | None, uncond_emb: torch.Tensor | None, guidance_scale: float = 1.0,
           modulate: Modulator | None = None, predict: Callable | None = None) -> Denoiser:
    """A denoiser for ``base`` with classifier-free guidance (Ho & Salimans 2022).

    With guidance, the unconditional and conditional branches go through the base in one
    batched call ``[uncond; cond]`` and ``modulate`` sees that doubled batch once, so both
    branches are modulated by one MCM call; then ``p = p_u + w (p_c - p_u)``.  ``predict(x, t, emb, i)``
    replaces ``base.predict`` when given (e.g. the base with ControlNet residuals).
    """
    use_cfg = guidance_scale != 1.0 and text_emb is not None
    if predict is None:
        predict = lambda x, t, emb, i: base.predict(x, t, emb)  # noqa: E731

    def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if use_cfg:
            x2 = torch.cat([x, x])
            p = predict(x2, t, torch.cat([uncond_emb, text_emb]), i)
            if modulate is not None:
                p = modulate(x2, p, t, i)
            p_u, p_c = p.chunk(2)
            return p_u + guidance_scale * (p_c - p_u)
        p = predict(x, t, text_emb, i)
        return modulate(x, p, t, i) if modulate is not None else p

    return denoise


def make_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu",
               seeds: list[int] | None = None) -> torch.Tensor:
    """Initial noise; per-sample ``seeds`` make each image reproducible regardless of batch composition."""
    if seeds is not None:
        return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    return torch.randn(shape, generator=generator).to(device)
