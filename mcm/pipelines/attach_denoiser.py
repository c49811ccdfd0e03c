"""``mcm.attach``: control an unmodified diffusers pipeline with trained MCMs.

Output modulation needs nothing from a pipeline but its denoiser's output ``p`` for ``(x_t, t)``, so a trained
MCM can drive a diffusers pipeline as it is, with no pipeline class of ours::

    import mcm
    with mcm.attach(sd_pipe, modules=["runs/seg_mcm/export"], conditions={"segmentation": labels},
                    conditioning_scale=2.0):
        images = sd_pipe(prompt="a red circle", num_inference_steps=30).images

Inside the ``with`` block the pipeline's denoiser (``unet`` or ``transformer``) is wrapped: each call's output
``p`` is replaced by ``p_hat = p + s (p gamma + beta)`` (or, for several modules, their composition
``p_u + sum_i w_i R_i (p_i - p_u)``) before the pipeline's own guidance and ``scheduler.step`` see it.  Both
guidance branches go through the denoiser in one batched call, so the modules modulate both, as
``MCMPipeline`` does; with the same modules, seed and arguments the images are ``MCMPipeline``'s
(``tests/test_attach.py``).  On exit, also after an exception, the denoiser and the scheduler are restored.

Only adapters that modulate the prediction attach (MCM): ControlNet and T2I-Adapter inject residuals into the
denoiser's forward pass and need their own pipeline (``MCMPipeline``, or diffusers' ControlNet pipelines).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from mcm.diffusion.control import controlled_predictor
from mcm.diffusion.sampling import StepCounter
from mcm.models.frozen_base import FrozenBase
from mcm.pipelines.module_io import load_module


def _denoiser_name(pipe) -> str:
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"pipe: {type(pipe).__name__} has neither a unet nor a transformer to attach to; expected a "
                     f"diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, "
                     f"StableDiffusion3Pipeline, DiTPipeline, ...)")


def _inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t)`` of a denoiser call, positional or by the names diffusers' models use."""
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if not isinstance(x, torch.Tensor) or t is None:
        raise TypeError("mcm.attach: the denoiser was called without (sample or hidden_states, timestep)")
    t = torch.as_tensor(t, device=x.device)
    return x, t.flatten()[0] if t.ndim else t  # one timestep per call (the pipelines expand it over the batch)


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    """The denoiser's output (a tuple, or a diffusers output with ``.sample``) with ``sample`` replaced."""
    if isinstance(out, tuple):
        return (sample, *out[1:])
    return type(out)(sample=sample)


@contextlib.contextmanager
def attach(pipe, modules: Sequence[str | Path | torch.nn.Module], conditions: Mapping[str, Any] | Sequence[Mapping],
           conditioning_scale: Any = None, weights: Sequence[float] | None = None, regions: Sequence | None = None,
           control_guidance_start: float = 0.0, control_guidance_end: float = 1.0,
           force_base: bool = False) -> Iterator[Any]:
    """Modulate ``pipe``'s denoiser with ``modules`` while the ``with`` block runs; yields ``pipe``.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer`` and a ``scheduler`` (not modified on exit).
        modules: exported MCMs (``mcm export`` directories or built-in names) or module objects.
        conditions: modality name -> map at the output size (tensor, numpy or PIL; label maps ``(H, W)`` or
            ``(B, H, W)``), or one dict per module.  Their size is the size the pipeline must sample at
            (``height`` / ``width``); their batch is the pipeline's (prompts x ``num_images_per_prompt``) or 1.
        conditioning_scale / weights / regions / control_guidance_start / control_guidance_end: as in
            ``MCMPipeline.__call__`` (a schedule list holds one value per inference step).
        force_base: attach modules trained on another base anyway.
    """
    from mcm.pipelines.pipeline import MCMPipeline, _deprecated_names

    name = _denoiser_name(pipe)
    denoiser, scheduler = getattr(pipe, name), pipe.scheduler
    comps = {k: v for k, v in pipe.components.items() if v is not None}
    base = FrozenBase.from_components(source=getattr(pipe, "name_or_path", None) or type(pipe).__name__, **comps)
    if base.packs_latents:
        raise ValueError(f"pipe: {type(pipe).__name__}'s transformer is called with latents packed 2x2 into tokens, "
                         f"which mcm.attach does not unpack yet; use MCMPipeline.from_pipe(pipe, modules=[...]), "
                         f"which shares its components and gives {type(pipe).__name__}'s images")
    loaded = [load_module(m, base, force_base) if isinstance(m, (str, Path)) else (m, {}) for m in modules]
    refused = [type(m).__name__ for m, _ in loaded if not getattr(m, "uses_base_prediction_only", False)]
    if refused:
        raise ValueError(f"modules: {refused} inject residuals into the denoiser's forward pass and cannot be "
                         f"attached to its output; sample them with MCMPipeline (or diffusers' ControlNet "
                         f"pipelines). mcm.attach takes modules that modulate the prediction (MCM)")
    # MCMPipeline's own input checks and controls, over the pipeline's components (nothing is copied)
    ours = MCMPipeline.from_base(base, [m for m, _ in loaded], weights, scheduler=scheduler,
                                 infos=[i for _, i in loaded])
    conds = ours.check_inputs(conditions)
    if not any(conds):
        raise ValueError("conditions: expected at least one map (modality name -> map) for the attached modules")
    B, size = ours._batch_and_size(conds, None)
    scale, scale_name, window = _deprecated_names({}, conditioning_scale, control_guidance_start,
                                                  control_guidance_end)
    controls = ours.prepare_controls(conds, B, size, scale, regions, None, scale_name)
    for c in controls:
        c.adapter.to(ours._execution_device)
    predict = controlled_predictor(base, controls, size, window, scheduler.config.num_train_timesteps)
    steps = [StepCounter(scheduler)]
    C = base.latent_channels

    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        x, t = _inputs(args, kwargs)
        if tuple(x.shape[-2:]) != tuple(size):
            ds = base.downsample
            raise ValueError(f"mcm.attach: the conditions' maps are {size[0] * ds}x{size[1] * ds} but the pipeline "
                             f"samples at {x.shape[-2] * ds}x{x.shape[-1] * ds}; call it with height={size[0] * ds}, "
                             f"width={size[1] * ds}")
        sample = out[0] if isinstance(out, tuple) else out.sample
        p = sample[:, :C]  # a learned-variance model (DiT) keeps its variance channels as they are
        p_hat = predict(x.float(), t, None, step=steps[0].next(), p=p.float()).to(sample.dtype)
        return _with_sample(out, torch.cat([p_hat, sample[:, C:]], dim=1) if sample.shape[1] > C else p_hat)

    def set_timesteps(*args, **kwargs):
        steps[0] = StepCounter(scheduler)  # a new sampling run: steps count from 0 again
        return original_set_timesteps(*args, **kwargs)

    own_forward = "forward" in vars(denoiser)  # e.g. an offload hook's wrapper: put back exactly what was there
    own_set = "set_timesteps" in vars(scheduler)
    original_forward, original_set_timesteps = denoiser.forward, scheduler.set_timesteps
    denoiser.forward, scheduler.set_timesteps = forward, set_timesteps
    try:
        yield pipe
    finally:
        if own_forward:
            denoiser.forward = original_forward
        else:
            del denoiser.forward
        if own_set:
            scheduler.set_timesteps = original_set_timesteps
        else:
            del scheduler.set_timesteps
