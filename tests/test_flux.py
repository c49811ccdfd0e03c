"""FLUX.1 (issue 27): with no control and with a zero-initialised MCM, the images are ``FluxPipeline``'s, same
seed, non-square size, two guidance scales, for a dev-like base (guidance embedding) and a schnell-like one
(none); the MCM modulates the spatial latent the family packs 2x2 into tokens.  (Training on it, and cached
predictions giving the online step's ``p`` and loss: ``test_base_families.py``, ``test_cached_families.py``,
``test_templates.py``.)"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline
from tiny_models import zero_mcm

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-5
PROMPTS = ["a red circle", "a blue square and a ring"]
H, W = 32, 64  # non-square: 16 x 32 latents, 8 x 16 tokens
CALL = dict(prompt=PROMPTS, num_inference_steps=3, height=H, width=W, output_type="pt")


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def tiny_flux_schnell_dir(tmp_path_factory):
    from tiny_models import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux_schnell"), guidance_embeds=False)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_flux_equals_flux_pipeline(variant, guidance_scale, request):
    path = request.getfixturevalue("tiny_flux_dir" if variant == "dev" else "tiny_flux_schnell_dir")
    ref = FluxPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**CALL, guidance_scale=guidance_scale, generator=gen()).images
    base = FrozenBase.from_pretrained(path)
    assert type(base).__name__ == "FluxBase" and base.latent_channels == 4 and base.default_guidance_scale == 3.5
    alone = MCMPipeline.from_base(base, [])
    alone.set_progress_bar_config(disable=True)
    got = alone(**CALL, guidance_scale=guidance_scale, generator=gen()).images
    assert got.shape == expected.shape == (2, 3, H, W)
    assert float((got - expected).abs().max()) < TOL
    zero = MCMPipeline.from_base(base, [zero_mcm(base)])
    zero.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 6, (2, H, W), generator=gen())
    got = zero(conditions={"segmentation": labels}, **CALL, guidance_scale=guidance_scale, generator=gen()).images
    assert float((got - expected).abs().max()) < TOL


def test_the_guidance_input_changes_a_dev_image_and_not_a_schnell_one(tiny_flux_dir, tiny_flux_schnell_dir):
    for path, changes in ((tiny_flux_dir, True), (tiny_flux_schnell_dir, False)):
        pipe = MCMPipeline.from_base(FrozenBase.from_pretrained(path), [])
        pipe.set_progress_bar_config(disable=True)
        a, b = (pipe(**CALL, guidance_scale=g, generator=gen()).images for g in (1.0, 5.0))
        assert (float((a - b).abs().max()) > 1e-4) == changes


def test_the_velocity_comes_back_on_the_spatial_latent(tiny_flux_dir):
    base = FrozenBase.from_pretrained(tiny_flux_dir)
    x = torch.randn(2, 4, 6, 10, generator=gen())
    with torch.no_grad():
        assert base.predict(x, torch.tensor([500.0, 250.0]), base.encode_context(PROMPTS, batch_size=2)).shape == x.shape
    with pytest.raises(ValueError, match="packs latents 2x2"):
        base.predict(torch.randn(1, 4, 5, 6), torch.tensor([500.0]), base.encode_context(["a"]))


def test_from_pipe_shares_a_flux_pipeline_and_attach_says_what_to_use(tiny_flux_dir):
    import mcm

    ref = FluxPipeline.from_pretrained(tiny_flux_dir)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**CALL, guidance_scale=3.5, generator=gen()).images
    ours = MCMPipeline.from_pipe(ref, modules=[])
    ours.set_progress_bar_config(disable=True)
    assert ours.transformer is ref.transformer if hasattr(ours, "transformer") else ours.unet is ref.transformer
    assert float((ours(**CALL, guidance_scale=3.5, generator=gen()).images - expected).abs().max()) < TOL
    labels = torch.zeros(2, H, W, dtype=torch.long)
    with pytest.raises(ValueError, match="MCMPipeline.from_pipe"):
        with mcm.attach(ref, modules=[zero_mcm(ours.base)], conditions={"segmentation": labels}):
            pass
