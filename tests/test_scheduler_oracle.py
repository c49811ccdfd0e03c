"""The oracle (issue: architecture): with no control, or a zero-initialised MCM, ``MCMPipeline`` gives
diffusers' own pipelines' images for every scheduler and guidance scale, within 1e-5 on CPU; the
ControlNet adapter gives ``StableDiffusionControlNetPipeline``'s.  Regression for: PNDM / UniPC /
Heun crashed on ``step(generator=...)``; the window counted loop steps (Heun: 2n-1 evaluations)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scheduler_oracle import GUIDANCE, PROMPTS, SCHEDULERS, STEPS, _gen, ddpm_difference, sd_difference, sd_pair

from mcm.models.frozen_base import FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline

TOL = 1e-5


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_no_control_equals_stable_diffusion_pipeline(tiny_sd_dir, name):
    ref, ours = sd_pair(tiny_sd_dir, SCHEDULERS[name])
    for g in GUIDANCE:
        assert sd_difference(ref, ours, g) < TOL, (name, g)


@pytest.mark.parametrize("name", ["DDIM", "Heun", "Euler-ancestral"])
def test_zero_initialised_mcm_equals_stable_diffusion_pipeline(tiny_sd_dir, name):
    ref, ours = sd_pair(tiny_sd_dir, SCHEDULERS[name])
    torch.manual_seed(0)
    mcm = MultimodalConditioningModule(latent_channels=4, modalities={"segmentation": {"num_classes": 3}},
                                       downsample=8, block_out_channels=(16, 32), layers_per_block=1,
                                       attention_levels=(), norm_num_groups=8).eval()
    pipe = MCMPipeline.from_base(ours.base, [mcm], scheduler=ours.scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    for g in GUIDANCE:
        assert sd_difference(ref, ours, g, {"segmentation": labels}, pipe) < TOL, (name, g)


@pytest.mark.parametrize("name", ["DDPM", "DDIM"])
def test_no_control_equals_ddpm_pipeline(tiny_uncond_dir, name):
    assert ddpm_difference(tiny_uncond_dir, SCHEDULERS[name]) < TOL


@pytest.mark.parametrize("name", ["DDIM", "PNDM", "Heun"])
def test_controlnet_adapter_equals_controlnet_pipeline(tiny_sd_dir, name):
    from diffusers import StableDiffusionControlNetPipeline

    from mcm.models.controlnet import ControlNetAdapter

    base = FrozenBase.from_pretrained(tiny_sd_dir)
    torch.manual_seed(0)
    adapter = ControlNetAdapter.from_base(base, {"segmentation": {"num_classes": 3}})
    with torch.no_grad():  # off the zero init, so the control changes the images
        for conv in [*adapter.controlnet.controlnet_down_blocks, adapter.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    adapter.eval()
    ref = StableDiffusionControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                            unet=base.unet, controlnet=adapter.controlnet,
                                            scheduler=SCHEDULERS[name].from_config(base.scheduler.config),
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = MCMPipeline.from_base(base, [adapter], scheduler=SCHEDULERS[name].from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    control = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()  # the 3-channel control image, in [0, 1]
    plain = None
    for g in GUIDANCE:
        expected = ref(prompt=PROMPTS, image=control, num_inference_steps=STEPS, guidance_scale=g, generator=_gen(),
                       output_type="pt").images
        got = pipe(conditions={"segmentation": labels}, prompt=PROMPTS, num_inference_steps=STEPS,
                   guidance_scale=g, generator=_gen(), output_type="pt").images
        assert float((got - expected).abs().max()) < TOL, (name, g)
        plain = pipe(conditions={}, prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=g, generator=_gen(), output_type="pt").images
        assert float((got - plain).abs().max()) > 1e-3  # the control does something


def test_window_means_the_same_noise_levels_for_every_scheduler(tiny_sd_dir):
    """The window is on t / T: Heun (2 evaluations a step) and DDIM switch modulation at the same noise level."""
    from mcm.diffusion.control import Control, controlled_predictor

    base = FrozenBase.from_pretrained(tiny_sd_dir)
    seen = []

    class Probe(MultimodalConditioningModule):
        def controlled_prediction(self, base, x_t, t, context, state, strength, base_prediction):
            seen.append(float(t))
            return base_prediction()

    probe = Probe(latent_channels=4, modalities={"sketch": {}}, downsample=8, block_out_channels=(16, 32),
                  layers_per_block=1, attention_levels=(), norm_num_groups=8)
    sketch = torch.zeros(1, 64, 64)
    for name in ("DDIM", "Heun", "PNDM"):
        seen.clear()
        sched = SCHEDULERS[name].from_config(base.scheduler.config)
        pipe = MCMPipeline.from_base(base, [probe], scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        pipe(conditions={"sketch": sketch}, num_inference_steps=10, modulation_window=(0.5, 1.0), generator=_gen(), output_type="pt").images
        all_t = [float(t) for t in sched.timesteps]
        assert seen and all(t / 1000 >= 0.5 for t in seen), name
        assert sorted(set(seen)) == sorted({t for t in all_t if t / 1000 >= 0.5}), name
