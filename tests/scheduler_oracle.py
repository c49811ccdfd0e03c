"""The scheduler oracle: ``MCMPipeline`` against diffusers' own pipelines, seed for seed.

With no conditions (and with a zero-initialised MCM) our pipeline must give the images of
``StableDiffusionPipeline`` (latent, text-conditional) and ``DDPMPipeline`` (unconditional
pixel base), and the ControlNet adapter those of ``StableDiffusionControlNetPipeline``, for
every scheduler.  The tests in ``test_scheduler_oracle.py`` assert it; this script also
writes the table in ``docs/reliability.md``:

    python tests/scheduler_oracle.py            # prints the markdown table (about a minute on CPU)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_sd, make_tiny_unconditional  # noqa: E402

SCHEDULERS = {
    "DDIM": DDIMScheduler, "PNDM": PNDMScheduler, "Euler": EulerDiscreteScheduler,
    "Euler-ancestral": EulerAncestralDiscreteScheduler, "DPM++ 2M": DPMSolverMultistepScheduler,
    "UniPC": UniPCMultistepScheduler, "Heun": HeunDiscreteScheduler, "DDPM": DDPMScheduler,
    "LMS": LMSDiscreteScheduler,
}
GUIDANCE = (1.0, 7.5)
PROMPTS = ["a red circle", "a blue square"]
STEPS = 4
SEED = 0


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def sd_pair(sd_dir: Path, scheduler_cls):
    """diffusers' StableDiffusionPipeline and our MCMPipeline on the same directory and scheduler."""
    from diffusers import StableDiffusionPipeline

    from mcm.pipelines import MCMPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    ours = MCMPipeline.from_pretrained(sd_dir, modules=[])
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = scheduler_cls.from_config(ours.scheduler.config)
    return ref, ours


def sd_difference(ref, ours, guidance_scale: float, conditions=None, adapters_pipe=None) -> float:
    """max |ours - diffusers| over the images of one sampling run (output_type="pt")."""
    expected = ref(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, generator=_gen(),
                   output_type="pt").images
    pipe = adapters_pipe or ours
    got = pipe(conditions=conditions, prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale,
               generator=_gen(), output_type="pt").images
    return float((got - expected).abs().max())


def ddpm_difference(uncond_dir: Path, scheduler_cls) -> float:
    """max |ours - DDPMPipeline| for the unconditional pixel base (DDPMPipeline's loop: DDPM / DDIM only)."""
    from diffusers import DDPMPipeline

    from mcm.pipelines import MCMPipeline

    ref = DDPMPipeline.from_pretrained(uncond_dir)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    expected = ref(batch_size=2, generator=_gen(), num_inference_steps=STEPS, output_type="np").images
    ours = MCMPipeline.from_pretrained(uncond_dir, modules=[])
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    got = ours(num_images=2, num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    return float(abs(got - expected).max())


def main() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        sd_dir, uncond_dir = make_tiny_sd(Path(tmp) / "sd"), make_tiny_unconditional(Path(tmp) / "uncond")
        rows = ["| scheduler | SD, guidance 1 | SD, guidance 7.5 | DDPMPipeline (pixel) | control: other seed |",
                "|---|---|---|---|---|"]
        for name, cls in SCHEDULERS.items():
            ref, ours = sd_pair(sd_dir, cls)
            diffs = [f"{sd_difference(ref, ours, g):.1e}" for g in GUIDANCE]
            pixel = f"{ddpm_difference(uncond_dir, cls):.1e}" if cls in (DDPMScheduler, DDIMScheduler) else "n/a"
            other = ours(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(SEED + 1), output_type="pt").images
            same = ours(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=_gen(), output_type="pt").images
            rows.append(f"| {name} | {diffs[0]} | {diffs[1]} | {pixel} | {float((other - same).abs().max()):.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(main())
