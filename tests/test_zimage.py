"""Z-Image (issue 27): with no control and with a zero-initialised MCM, the images are ``ZImagePipeline``'s, same
seed, non-square size, guidance off (0, Z-Image-Turbo's setting) and on with the default and a given negative
prompt, and with a second scheduler; prompts of different lengths in one batch (the transformer takes lists).
(Training on it, and cached predictions giving the online step's ``p`` and loss: ``test_base_families.py``,
``test_cached_families.py``, ``test_templates.py``.)"""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline
from tiny_models import zero_mcm

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-4  # complex64 rotary embeddings (diffusers' own Z-Image tests allow more)
PROMPTS = ["a red circle", "a blue square and a ring on the left"]
H, W = 32, 64  # non-square: 16 x 32 latents (x2 VAE), 8 x 16 patches



def call() -> dict:
    """The call's arguments with a fresh prompt list: ``ZImagePipeline`` rewrites the caller's list in place (each
    prompt replaced by its chat-template text), which would template it twice in the next call."""
    return dict(prompt=list(PROMPTS), num_inference_steps=3, height=H, width=W, output_type="pt")


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def reference(tiny_zimage_dir):
    pipe = ZImagePipeline.from_pretrained(tiny_zimage_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale,negative_prompt", [(0.0, None), (5.0, None), (3.0, ["blurry", "dark"])])
def test_zimage_equals_zimage_pipeline(tiny_zimage_dir, reference, guidance_scale, negative_prompt):
    def neg():  # a fresh list too: the pipeline rewrites the negative prompts in place as well
        return list(negative_prompt) if isinstance(negative_prompt, list) else negative_prompt

    expected = reference(**call(), negative_prompt=neg(), guidance_scale=guidance_scale, generator=gen()).images
    base = FrozenBase.from_pretrained(tiny_zimage_dir)
    assert type(base).__name__ == "ZImageBase" and base.latent_channels == 16 and base.default_guidance_scale == 5.0
    for modules in ([], [zero_mcm(base)]):
        pipe = MCMPipeline.from_base(base, modules)
        pipe.set_progress_bar_config(disable=True)
        conditions = {"segmentation": torch.randint(0, 6, (2, H, W), generator=gen())} if modules else None
        got = pipe(**call(), conditions=conditions, negative_prompt=neg(), guidance_scale=guidance_scale,
                   generator=gen()).images
        assert got.shape == expected.shape == (2, 3, H, W)
        assert float((got - expected).abs().max()) < TOL, float((got - expected).abs().max())


def test_a_second_scheduler(tiny_zimage_dir):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.3, max_shift=0.9, shift=1.0,
                                            stochastic_sampling=False, time_shift_type="linear")
    ref = ZImagePipeline.from_pretrained(tiny_zimage_dir, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**call(), guidance_scale=4.0, generator=gen()).images
    ours = MCMPipeline.from_base(FrozenBase.from_pretrained(tiny_zimage_dir), [],
                                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched.config))
    ours.set_progress_bar_config(disable=True)
    assert float((ours(**call(), guidance_scale=4.0, generator=gen()).images - expected).abs().max()) < TOL


def test_the_velocity_and_latents(tiny_zimage_dir):
    base = FrozenBase.from_pretrained(tiny_zimage_dir)
    images = torch.rand(2, 3, 16, 24, generator=gen()) * 2 - 1
    z = base.encode_images(images)
    raw = base.vae.encode(images).latent_dist.mean
    assert torch.allclose(z, (raw - base.vae.config.shift_factor) * base.vae.config.scaling_factor, atol=1e-5)
    x = torch.randn(2, 16, 6, 10, generator=gen())
    ctx = base.encode_context(PROMPTS, batch_size=2)
    assert ctx["prompt_embeds_mask"].sum(1).tolist()[0] < ctx["prompt_embeds"].shape[1]  # ragged: padded, masked
    with torch.no_grad():
        p = base.predict(x, torch.tensor([500.0, 250.0]), ctx)
        # the pipeline's call of the transformer: lists, (1000 - t) / 1000, the output negated
        caps = [e[m.bool()] for e, m in zip(ctx["prompt_embeds"], ctx["prompt_embeds_mask"])]
        out = base.unet(list(x.unsqueeze(2).unbind(0)), torch.tensor([0.5, 0.75]), caps, return_dict=False)[0]
    assert torch.allclose(p, -torch.stack(out).squeeze(2), atol=1e-5)
    with pytest.raises(ValueError, match="packs latents 2x2"):
        base.predict(torch.randn(1, 16, 5, 6), torch.tensor([500.0]), base.encode_context(["a"]))
