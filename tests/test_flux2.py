"""FLUX.2 [dev] (issue 27): with no control and with a zero-initialised MCM, the images are ``Flux2Pipeline``'s, same
seed, non-square size, two guidance inputs, and with a second scheduler; the model space is the patchified,
batch-normalised latent the pipeline draws its noise on; ``from_pipe`` shares a ``Flux2Pipeline``.  (Training on it,
and cached predictions giving the online step's ``p`` and loss: ``test_base_families.py``,
``test_cached_families.py``, ``test_templates.py``.)"""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline
from tiny_models import zero_mcm

pytestmark = [pytest.mark.filterwarnings("ignore:You are trying to `self.log"),
              pytest.mark.filterwarnings("ignore:.*processor_kwargs")]
TOL = 1e-5
PROMPTS = ["a red circle", "a blue square and a ring on the left"]
H, W = 32, 64  # non-square: 16 x 32 latents (x2 VAE), 8 x 16 patchified positions
CALL = dict(prompt=PROMPTS, num_inference_steps=3, height=H, width=W, output_type="pt")


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def reference(tiny_flux2_dir):
    pipe = Flux2Pipeline.from_pretrained(tiny_flux2_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale", [4.0, 1.5])
def test_flux2_equals_flux2_pipeline(tiny_flux2_dir, reference, guidance_scale):
    expected = reference(**CALL, guidance_scale=guidance_scale, generator=gen()).images
    base = FrozenBase.from_pretrained(tiny_flux2_dir)
    assert type(base).__name__ == "Flux2Base" and base.latent_channels == 16 and base.downsample == 4
    assert base.default_guidance_scale == 4.0 and not base.uses_cfg and base.sample_size == (64, 64)
    for modules in ([], [zero_mcm(base)]):
        pipe = MCMPipeline.from_base(base, modules)
        pipe.set_progress_bar_config(disable=True)
        conditions = {"segmentation": torch.randint(0, 6, (2, H, W), generator=gen())} if modules else None
        got = pipe(**CALL, conditions=conditions, guidance_scale=guidance_scale, generator=gen()).images
        assert got.shape == expected.shape == (2, 3, H, W)
        assert float((got - expected).abs().max()) < TOL


def test_a_second_scheduler_and_the_guidance_input(tiny_flux2_dir):
    """Euler without dynamic shifting (a fixed shift; ``mu`` is then unused, as in the pipeline); the guidance
    input does change the image."""
    sched = FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=False)
    ref = Flux2Pipeline.from_pretrained(tiny_flux2_dir, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**CALL, guidance_scale=4.0, generator=gen()).images
    ours = MCMPipeline.from_base(FrozenBase.from_pretrained(tiny_flux2_dir), [],
                                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched.config))
    ours.set_progress_bar_config(disable=True)
    assert float((ours(**CALL, guidance_scale=4.0, generator=gen()).images - expected).abs().max()) < TOL
    other = ours(**CALL, guidance_scale=1.0, generator=gen()).images
    assert float((other - expected).abs().max()) > 1e-4


def test_latents_are_patchified_and_batch_normalised(tiny_flux2_dir):
    base = FrozenBase.from_pretrained(tiny_flux2_dir)
    images = torch.rand(2, 3, 16, 24, generator=gen()) * 2 - 1
    z = base.encode_images(images)
    assert z.shape == (2, 16, 4, 6)
    raw = Flux2Pipeline._patchify_latents(base.vae.encode(images).latent_dist.mode())
    mean = base.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(base.vae.bn.running_var.view(1, -1, 1, 1) + base.vae.config.batch_norm_eps)
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5)
    decoded = base.decode(z)
    assert decoded.shape == (2, 3, 16, 24)
    # the velocity comes back on the same grid: tokens in raster order
    x = torch.randn(2, 16, 4, 6, generator=gen())
    ctx = base.with_guidance(base.encode_context(PROMPTS, batch_size=2), 4.0)
    with torch.no_grad():
        p = base.predict(x, torch.tensor([500.0, 250.0]), ctx)
        tokens = base.unet(hidden_states=Flux2Pipeline._pack_latents(x), timestep=torch.tensor([0.5, 0.25]),
                           guidance=torch.tensor([4.0, 4.0]), encoder_hidden_states=ctx["prompt_embeds"],
                           txt_ids=Flux2Pipeline._prepare_text_ids(ctx["prompt_embeds"]),
                           img_ids=Flux2Pipeline._prepare_latent_ids(x), return_dict=False)[0]
    assert torch.allclose(p, Flux2Pipeline._unpack_latents_with_ids(tokens, Flux2Pipeline._prepare_latent_ids(x)),
                          atol=1e-6)


def test_from_pipe_shares_a_flux2_pipeline_and_klein_is_not_this_family(tiny_flux2_dir, reference, tmp_path):
    import shutil

    import mcm
    from mcm.models.families import detect_family

    expected = reference(**CALL, guidance_scale=4.0, generator=gen()).images
    ours = MCMPipeline.from_pipe(reference, modules=[])
    ours.set_progress_bar_config(disable=True)
    assert float((ours(**CALL, guidance_scale=4.0, generator=gen()).images - expected).abs().max()) < TOL
    with pytest.raises(ValueError, match="MCMPipeline.from_pipe"):
        with mcm.attach(reference, modules=[zero_mcm(ours.base)],
                        conditions={"segmentation": torch.zeros(2, H, W, dtype=torch.long)}):
            pass
    assert detect_family(tiny_flux2_dir) == "flux2"
    klein = tmp_path / "klein"
    shutil.copytree(tiny_flux2_dir, klein)
    cfg = json.loads((klein / "text_encoder" / "config.json").read_text())
    (klein / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError):
        detect_family(klein)


def test_the_pipelines_own_prompt_arguments(tiny_flux2_dir, reference, tiny_sd_dir):
    """``max_sequence_length`` and ``text_encoder_out_layers`` reach the prompt encoding as in ``Flux2Pipeline``
    (diffusers' own FLUX.2 tests call it with a short sequence and early layers); a family without them says so."""
    own = dict(max_sequence_length=64, text_encoder_out_layers=(1, 2, 3))
    expected = reference(**CALL, guidance_scale=4.0, generator=gen(), **own).images
    default = reference(**CALL, guidance_scale=4.0, generator=gen()).images
    assert float((expected - default).abs().max()) > 1e-4
    ours = MCMPipeline.from_pretrained(tiny_flux2_dir, modules=[])
    ours.set_progress_bar_config(disable=True)
    assert float((ours(**CALL, guidance_scale=4.0, generator=gen(), **own).images - expected).abs().max()) < TOL
    assert float((ours(**CALL, guidance_scale=4.0, generator=gen()).images - default).abs().max()) < TOL
    sd = MCMPipeline.from_pretrained(tiny_sd_dir, modules=[])
    with pytest.raises(ValueError, match="text_encoder_out_layers: the sd base .* takes no such argument"):
        sd(prompt="a", num_inference_steps=2, output_type="pt", text_encoder_out_layers=(1,))
