"""Qwen-Image (issue 27): with no control and with a zero-initialised MCM, the images are ``QwenImagePipeline``'s,
same seed, non-square size, with and without true classifier-free guidance (a negative prompt), at two scales and
with a second scheduler; prompts of different lengths in one batch; the MCM modulates the spatial latent the family
packs 2x2 into tokens.  (Training on it, and cached predictions giving the online step's ``p`` and loss:
``test_base_families.py``, ``test_cached_families.py``, ``test_templates.py``.)"""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline
from tiny_models import zero_mcm

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-5
PROMPTS = ["a red circle", "a blue square and a ring on the left"]  # different lengths: padded, masked
H, W = 32, 64  # non-square: 8 x 16 latents (x4 VAE), 4 x 8 tokens
CALL = dict(prompt=PROMPTS, num_inference_steps=3, height=H, width=W, output_type="pt")


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def reference(tiny_qwenimage_dir):
    pipe = QwenImagePipeline.from_pretrained(tiny_qwenimage_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative_prompt,scale", [(None, 4.0), ("blurry", 4.0), (["blurry", "dark"], 2.5)])
def test_qwenimage_equals_qwenimage_pipeline(tiny_qwenimage_dir, reference, negative_prompt, scale):
    expected = reference(**CALL, negative_prompt=negative_prompt, true_cfg_scale=scale, generator=gen()).images
    base = FrozenBase.from_pretrained(tiny_qwenimage_dir)
    assert type(base).__name__ == "QwenImageBase" and base.latent_channels == 4 and base.downsample == 4
    assert base.default_guidance_scale == 4.0
    alone = MCMPipeline.from_base(base, [])
    alone.set_progress_bar_config(disable=True)
    got = alone(**CALL, negative_prompt=negative_prompt, guidance_scale=scale, generator=gen()).images
    assert got.shape == expected.shape == (2, 3, H, W)
    assert float((got - expected).abs().max()) < TOL
    zero = MCMPipeline.from_base(base, [zero_mcm(base)])
    zero.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 6, (2, H, W), generator=gen())
    got = zero(conditions={"segmentation": labels}, **CALL, negative_prompt=negative_prompt, guidance_scale=scale,
               generator=gen()).images
    assert float((got - expected).abs().max()) < TOL


def test_a_second_scheduler_and_guidance_that_changes_the_image(tiny_qwenimage_dir, reference):
    """Euler with stochastic sampling off is the default; the same base under Euler with exponential shift off
    (``use_dynamic_shifting`` with ``shift_terminal``) is the second; and the negative prompt does change it."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(reference.scheduler.config, shift_terminal=None,
                                                        time_shift_type="linear")
    ref = QwenImagePipeline.from_pretrained(tiny_qwenimage_dir, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**CALL, negative_prompt="blurry", true_cfg_scale=4.0, generator=gen()).images
    ours = MCMPipeline.from_base(FrozenBase.from_pretrained(tiny_qwenimage_dir), [],
                                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched.config))
    ours.set_progress_bar_config(disable=True)
    got = ours(**CALL, negative_prompt="blurry", guidance_scale=4.0, generator=gen()).images
    assert float((got - expected).abs().max()) < TOL
    plain = ours(**CALL, guidance_scale=4.0, generator=gen()).images  # no negative prompt: no guidance
    assert float((plain - got).abs().max()) > 1e-4


def test_latents_round_trip_and_the_velocity_comes_back_on_the_spatial_latent(tiny_qwenimage_dir):
    base = FrozenBase.from_pretrained(tiny_qwenimage_dir)
    images = torch.rand(2, 3, 16, 24, generator=gen()) * 2 - 1
    z = base.encode_images(images)
    assert z.shape == (2, 4, 4, 6)
    # the pipeline's normalisation: (z - mean) / std, undone by decode before the VAE
    raw = base.vae.encode(images[:, :, None]).latent_dist.mean[:, :, 0]
    mean = torch.tensor(base.vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(base.vae.config.latents_std).view(1, 4, 1, 1)
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5)
    assert base.decode(z).shape == (2, 3, 16, 24)
    x = torch.randn(2, 4, 6, 10, generator=gen())
    with torch.no_grad():
        assert base.predict(x, torch.tensor([500.0, 250.0]), base.encode_context(PROMPTS, batch_size=2)).shape == x.shape
    with pytest.raises(ValueError, match="packs latents 2x2"):
        base.predict(torch.randn(1, 4, 5, 6), torch.tensor([500.0]), base.encode_context(["a"]))


def test_caption_dropout_pads_to_the_empty_prompt(tiny_qwenimage_dir):
    base = FrozenBase.from_pretrained(tiny_qwenimage_dir)
    context = base.encode_context(PROMPTS, batch_size=2)
    empty = base.encode_context(["", ""], batch_size=2)
    dropped = base.drop_context(context, torch.tensor([True, False]))
    n = context["prompt_embeds"].shape[1]
    assert dropped["prompt_embeds"].shape[1] == n > empty["prompt_embeds"].shape[1]
    m = int(empty["prompt_embeds_mask"][0].sum())
    assert int(dropped["prompt_embeds_mask"][0].sum()) == m
    assert torch.equal(dropped["prompt_embeds"][0, :m], empty["prompt_embeds"][0, :m])
    assert torch.equal(dropped["prompt_embeds"][1], context["prompt_embeds"][1])


def test_from_pipe_shares_a_qwenimage_pipeline_and_attach_says_what_to_use(reference):
    import mcm

    expected = reference(**CALL, generator=gen()).images
    ours = MCMPipeline.from_pipe(reference, modules=[])
    ours.set_progress_bar_config(disable=True)
    assert float((ours(**CALL, generator=gen()).images - expected).abs().max()) < TOL
    labels = torch.zeros(2, H, W, dtype=torch.long)
    with pytest.raises(ValueError, match="MCMPipeline.from_pipe"):
        with mcm.attach(reference, modules=[zero_mcm(ours.base)], conditions={"segmentation": labels}):
            pass


def test_cached_prompts_of_different_lengths_stack_padded(tiny_qwenimage_dir):
    """Samples encoded in different ``mcm data encode`` batches carry prompts padded to different lengths; the
    DataModule's collation pads them to the batch's longest (mask 0), which the transformer then ignores."""
    from datamodules.cached_fields import decode_cached
    from datamodules.shard_stream import collate
    from mcm.training.encode import EncodeSettings, encode_batch

    base = FrozenBase.from_pretrained(tiny_qwenimage_dir)
    settings = EncodeSettings(base=str(tiny_qwenimage_dir), image_size=32, batch_size=1, flip=False, predictions=0)
    images = [torch.rand(3, 32, 32, generator=gen()) * 2 - 1]
    items = [decode_cached(encode_batch(base, settings, images, [c], [None], [f"k{i}"])[0]) | {"key": f"k{i}"}
             for i, c in enumerate(PROMPTS)]
    lengths = [it["text_emb"]["prompt_embeds"].shape[0] for it in items]
    assert lengths[0] < lengths[1]
    batch = collate(items, 0)
    ctx = batch["text_emb"]
    assert ctx["prompt_embeds"].shape[:2] == ctx["prompt_embeds_mask"].shape == (2, lengths[1])
    assert ctx["prompt_embeds_mask"].sum(1).tolist() == lengths
    x, t = torch.randn(2, 4, 8, 8, generator=gen()), torch.tensor([700.0, 700.0])
    with torch.no_grad():
        one = base.predict(x[:1], t[:1], {k: v[:1, :lengths[0]] for k, v in ctx.items()})
        padded = base.predict(x, t, ctx)[:1]
    assert float((one - padded).abs().max()) < 1e-5
