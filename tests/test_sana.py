"""Sana (issue 27): with no control and with a zero-initialised MCM, the images are ``SanaPipeline``'s (resolution
binning off, the equal call), same seed, non-square size, two guidance scales with the default and a given negative
prompt, with Sana's DPM-Solver++ for flow and with flow-matching Euler.  (Training on it, and cached predictions
giving the online step's ``p`` and loss: ``test_base_families.py``, ``test_cached_families.py``,
``test_templates.py``.)"""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline
from tiny_models import zero_mcm

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-5
PROMPTS = ["a red circle", "A blue square and a ring "]  # lower-cased and stripped, as the pipeline does
H, W = 32, 64  # non-square: 16 x 32 latents (x2 autoencoder)
CALL = dict(prompt=PROMPTS, num_inference_steps=3, height=H, width=W, output_type="pt")


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("scheduler", ["dpm", "euler"])
@pytest.mark.parametrize("guidance_scale,negative_prompt", [(1.0, None), (4.5, None), (3.0, "Blurry")])
def test_sana_equals_sana_pipeline(tiny_sana_dir, scheduler, guidance_scale, negative_prompt):
    ref = SanaPipeline.from_pretrained(tiny_sana_dir)
    if scheduler == "euler":
        ref.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_progress_bar_config(disable=True)
    kw = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    expected = ref(**CALL, **kw, guidance_scale=guidance_scale, use_resolution_binning=False, generator=gen()).images
    base = FrozenBase.from_pretrained(tiny_sana_dir)
    assert type(base).__name__ == "SanaBase" and base.latent_channels == 4 and base.downsample == 2
    assert base.default_guidance_scale == 4.5 and base.prediction_type == "flow"
    sched = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config) if scheduler == "euler" else None
    for modules in ([], [zero_mcm(base)]):
        pipe = MCMPipeline.from_base(base, modules, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        conditions = {"segmentation": torch.randint(0, 6, (2, H, W), generator=gen())} if modules else None
        got = pipe(**CALL, **kw, conditions=conditions, guidance_scale=guidance_scale, generator=gen()).images
        assert got.shape == expected.shape == (2, 3, H, W)
        assert float((got - expected).abs().max()) < TOL, (modules, float((got - expected).abs().max()))


def test_sana_latents_and_its_training_process(tiny_sana_dir):
    from mcm.diffusion.forward_process import FlowMatchingProcess, forward_process_for

    base = FrozenBase.from_pretrained(tiny_sana_dir)
    images = torch.rand(2, 3, 16, 24, generator=gen()) * 2 - 1
    z = base.encode_images(images)
    assert z.shape == (2, 4, 8, 12)
    assert torch.allclose(z, base.vae.encode(images).latent * base.vae.config.scaling_factor, atol=1e-6)
    assert base.decode(z).shape == (2, 3, 16, 24)
    fp = forward_process_for(base.scheduler.config)
    assert isinstance(fp, FlowMatchingProcess) and fp.scheduler.config.shift == 3.0  # Sana's flow_shift
    t = fp.sample_timesteps(4096, "cpu", torch.Generator().manual_seed(0))
    assert abs(float((t / 1000).median()) - 3 * 0.5 / (1 + 2 * 0.5)) < 0.02  # logit-normal median, shifted by 3


def test_resolution_binning_as_the_pipeline(tiny_sana_dir, tiny_pixart_sigma_dir):
    """``use_resolution_binning=True`` samples at the pipeline's bin for the transformer's sample size (16: the
    512 px table; 32x64 asked, 352x704 sampled) and resizes and crops back, as ``SanaPipeline`` does by default;
    a base whose sample size has no table says so."""
    kw = dict(prompt=["a red circle"], num_inference_steps=2, height=32, width=64, output_type="pt",
              guidance_scale=4.5)
    ref = SanaPipeline.from_pretrained(tiny_sana_dir)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.register_to_config(sample_size=16)
    expected = ref(**kw, generator=gen()).images
    base = FrozenBase.from_pretrained(tiny_sana_dir)
    base.unet.register_to_config(sample_size=16)
    pipe = MCMPipeline.from_base(base, [])
    pipe.set_progress_bar_config(disable=True)
    got = pipe(**kw, use_resolution_binning=True, generator=gen()).images
    assert got.shape == expected.shape == (1, 3, 32, 64)
    assert float((got - expected).abs().max()) < TOL
    plain = pipe(**kw, generator=gen()).images  # off by default: sampled at 32x64 itself
    assert float((plain - got).abs().max()) > 1e-3
    pixart = MCMPipeline.from_pretrained(tiny_pixart_sigma_dir, modules=[])
    with pytest.raises(ValueError, match="has no aspect-ratio bins .* sample sizes \\[32, 64, 128, 256\\]"):
        pixart(prompt="a", num_inference_steps=2, output_type="pt", use_resolution_binning=True)
