"""PixArt-Σ (issue 27): with no control, with a zero-initialised MCM and through ``mcm.attach``, the images are
``PixArtSigmaPipeline``'s, same seed, non-square size, two guidance scales and two schedulers; a trained-looking
(non-zero) MCM gives the same images through ``mcm.attach`` as through ``MCMPipeline``.  (Training on it:
``test_base_families.py``, ``test_cached_families.py``, ``test_templates.py``.)  The pipeline is called with ``use_resolution_binning=False`` (MCMPipeline
samples at the size asked for) and ``clean_caption=False`` (prompts are encoded as given)."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtSigmaPipeline

import mcm
from mcm.models.frozen_base import FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-5
PROMPTS = ["a red circle", "A Blue square and a ring "]  # lower-cased and stripped, as the pipeline does
H, W = 32, 16  # non-square: 16 x 8 latents
CALL = dict(prompt=PROMPTS, num_inference_steps=3, height=H, width=W, output_type="pt")


def mcm_module(base, std: float = 0.0) -> MultimodalConditioningModule:
    torch.manual_seed(0)
    m = MultimodalConditioningModule(latent_channels=base.latent_channels, modalities={"segmentation": {"num_classes": 6}},
                                     downsample=base.downsample, block_out_channels=(16, 32), layers_per_block=1,
                                     attention_levels=(), norm_num_groups=8).eval()
    if std:
        with torch.no_grad():
            m.unet.conv_out.weight.normal_(0, std, generator=torch.Generator().manual_seed(1))
    return m


def reference(path, scheduler_cls):
    ref = PixArtSigmaPipeline.from_pretrained(path)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_pixart_sigma_equals_its_diffusers_pipeline(tiny_pixart_sigma_dir, scheduler_cls, guidance_scale):
    ref = reference(tiny_pixart_sigma_dir, scheduler_cls)
    expected = ref(**CALL, guidance_scale=guidance_scale, generator=gen(), use_resolution_binning=False,
                   clean_caption=False).images
    base = FrozenBase.from_pretrained(tiny_pixart_sigma_dir)
    assert type(base).__name__ == "PixArtSigmaBase" and base.default_guidance_scale == 4.5
    sched = scheduler_cls.from_config(base.scheduler.config)
    alone = MCMPipeline.from_base(base, [], scheduler=sched)
    alone.set_progress_bar_config(disable=True)
    got = alone(**CALL, guidance_scale=guidance_scale, generator=gen()).images
    assert got.shape == expected.shape == (2, 3, H, W)
    assert float((got - expected).abs().max()) < TOL
    labels = torch.randint(0, 6, (2, H, W), generator=gen())
    zero = MCMPipeline.from_base(base, [mcm_module(base)], scheduler=sched)
    zero.set_progress_bar_config(disable=True)
    got = zero(conditions={"segmentation": labels}, **CALL, guidance_scale=guidance_scale, generator=gen()).images
    assert float((got - expected).abs().max()) < TOL
    with mcm.attach(ref, modules=[mcm_module(base)], conditions={"segmentation": labels}):
        attached = ref(**CALL, guidance_scale=guidance_scale, generator=gen(), use_resolution_binning=False,
                       clean_caption=False).images
    assert float((attached - expected).abs().max()) < TOL


def test_attach_equals_mcm_pipeline_with_a_nonzero_module(tiny_pixart_sigma_dir):
    ref = reference(tiny_pixart_sigma_dir, DDIMScheduler)
    base = FrozenBase.from_pretrained(tiny_pixart_sigma_dir)
    module = mcm_module(base, std=0.05)
    labels = torch.randint(0, 6, (2, H, W), generator=gen())
    ours = MCMPipeline.from_base(base, [module], scheduler=DDIMScheduler.from_config(base.scheduler.config))
    ours.set_progress_bar_config(disable=True)
    got = ours(conditions={"segmentation": labels}, **CALL, guidance_scale=4.5, conditioning_scale=2.0,
               generator=gen()).images
    plain = ref(**CALL, guidance_scale=4.5, generator=gen(), use_resolution_binning=False, clean_caption=False).images
    with mcm.attach(ref, modules=[module], conditions={"segmentation": labels}, conditioning_scale=2.0):
        attached = ref(**CALL, guidance_scale=4.5, generator=gen(), use_resolution_binning=False,
                       clean_caption=False).images
    assert float((got - plain).abs().max()) > 1e-3  # the module does something
    assert float((attached - got).abs().max()) < TOL
