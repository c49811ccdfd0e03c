"""Every base family (issue: base families): with no control, or a zero-initialised MCM, ``MCMPipeline`` gives
the family's diffusers pipeline's images (SDXL, DiT, SD3) seed for seed; a few MCM training steps on a fixed
batch lower the loss and leave the base's bytes unchanged; ControlNet is refused with a clear error where
diffusers' ``ControlNetModel.from_unet`` does not apply."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from mcm.models.frozen_base import FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline
from tiny_models import train_and_export

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-5
PROMPTS = ["a red circle", "a blue square"]
SEG = {"segmentation": {"num_classes": 6}}


def ours(path, scheduler_cls=None, modules=()):
    base = FrozenBase.from_pretrained(path)
    sched = scheduler_cls.from_config(base.scheduler.config) if scheduler_cls else base.scheduler
    pipe = MCMPipeline.from_base(base, list(modules), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zero_mcm(base) -> MultimodalConditioningModule:
    torch.manual_seed(0)
    return MultimodalConditioningModule(latent_channels=base.latent_channels, modalities=SEG,
                                        downsample=base.downsample, block_out_channels=(16, 32), layers_per_block=1,
                                        attention_levels=(), norm_num_groups=8).eval()


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DDIMScheduler])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sdxl_equals_stable_diffusion_xl_pipeline(tiny_sdxl_dir, scheduler_cls, guidance_scale):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    expected = ref(prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(),
                   output_type="pt").images
    pipe = ours(tiny_sdxl_dir, scheduler_cls)
    got = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(), output_type="pt").images
    assert float((got - expected).abs().max()) < TOL
    with_mcm = MCMPipeline.from_base(pipe.base, [zero_mcm(pipe.base)], scheduler=pipe.scheduler)
    with_mcm.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 6, (2, 16, 16), generator=gen())
    got = with_mcm(conditions={"segmentation": labels}, prompt=PROMPTS, num_inference_steps=3,
                   guidance_scale=guidance_scale, generator=gen(), output_type="pt").images
    assert float((got - expected).abs().max()) < TOL


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_dit_equals_dit_pipeline(tiny_dit_dir, scheduler_cls, guidance_scale):
    from diffusers import DiTPipeline

    ref = DiTPipeline.from_pretrained(tiny_dit_dir)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    labels = [3, 917]
    expected = ref(class_labels=labels, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(),
                   output_type="np").images  # (B, H, W, 3)
    pipe = ours(tiny_dit_dir, scheduler_cls)
    got = pipe(class_labels=labels, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(),
               output_type="np").images
    assert abs(got - expected).max() < TOL
    with_mcm = MCMPipeline.from_base(pipe.base, [zero_mcm(pipe.base)], scheduler=pipe.scheduler)
    with_mcm.set_progress_bar_config(disable=True)
    got = with_mcm(conditions={"segmentation": torch.randint(0, 6, (2, 16, 16), generator=gen())},
                   class_labels=labels, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(),
                   output_type="np").images
    assert abs(got - expected).max() < TOL
    other = pipe(class_labels=[5, 6], num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(),
                 output_type="np").images
    assert abs(other - expected).max() > 1e-3  # the labels condition the samples


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sd3_equals_stable_diffusion_3_pipeline(tiny_sd3_dir, guidance_scale):
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(),
                   output_type="pt").images
    pipe = ours(tiny_sd3_dir)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    got = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(), output_type="pt").images
    assert float((got - expected).abs().max()) < TOL
    with_mcm = MCMPipeline.from_base(pipe.base, [zero_mcm(pipe.base)], scheduler=pipe.scheduler)
    with_mcm.set_progress_bar_config(disable=True)
    got = with_mcm(conditions={"segmentation": torch.randint(0, 6, (2, 16, 16), generator=gen())}, prompt=PROMPTS,
                   num_inference_steps=3, guidance_scale=guidance_scale, generator=gen(), output_type="pt").images
    assert float((got - expected).abs().max()) < TOL


def family_batch(n: int = 4, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "segmentation": torch.randint(0, 6, (n, size, size), generator=g),
            "caption": ["a red circle"] * n, "class_label": torch.tensor([1, 2, 3, 4][:n])}


@pytest.mark.parametrize("family", ["sdxl", "dit", "sd3", "pixart_sigma", "flux", "flux2", "qwenimage",
                                    "sana", "zimage"])
def test_mcm_trains_on_every_family_and_the_base_is_unchanged(family, request):
    from mcm.training.mcm_module import MCMModule

    path = request.getfixturevalue(f"tiny_{family}_dir")
    torch.manual_seed(0)
    m = MCMModule(base=str(path), modalities=SEG, block_out_channels=(16, 32), attention_levels=(), lr=3e-3,
                  warmup_steps=0, modality_dropout=0.0, drop_all_prob=0.0, caption_dropout=0.0)
    assert m.base.family == family
    before = m.base.content_hash()
    opt = m.configure_optimizers()["optimizer"]
    batch = family_batch(size=32 if family in ("flux", "flux2", "qwenimage", "zimage") else 16)  # 8 x their grids
    m.train()
    losses = []
    for step in range(12):
        torch.manual_seed(1234)  # fixed batch, noise and timesteps: the loss must fall
        opt.zero_grad()
        loss = m.training_step(batch, step)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in m.base.frozen_parameters())
    m.base._hash = None
    assert m.base.content_hash() == before


def test_flow_matching_forward_process_by_hand(tiny_sd3_dir):
    from mcm.diffusion.forward_process import FlowMatchingProcess, forward_process_for

    base = FrozenBase.from_pretrained(tiny_sd3_dir)
    fp = forward_process_for(base.scheduler.config)
    assert isinstance(fp, FlowMatchingProcess)
    t = fp.sample_timesteps(4096, "cpu", torch.Generator().manual_seed(0))
    sigma = t / 1000
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1
    shift = base.scheduler.config.shift
    assert abs(float(sigma.median()) - shift * 0.5 / (1 + (shift - 1) * 0.5)) < 0.02  # logit-normal median 0.5, shifted
    x0, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    tt = torch.tensor([100.0, 400.0, 700.0, 999.0])
    s = (tt / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(fp.add_noise(x0, noise, tt), (1 - s) * x0 + s * noise)
    assert torch.equal(fp.target(x0, noise, tt), noise - x0)
    with pytest.raises(ValueError, match="weighting"):
        forward_process_for(base.scheduler.config, weighting="min_snr")


@pytest.mark.parametrize("family,match", [("dit", "diffusers has no ControlNet for DiT"),
                                          ("pixart_sigma", "diffusers has no ControlNet for PixArt-Σ"),
                                          ("flux2", "diffusers has no ControlNet for FLUX.2")])
def test_controlnet_where_diffusers_has_none_is_a_clear_error(family, match, request):
    from mcm.models.controlnet import ControlNetAdapter

    base = FrozenBase.from_pretrained(request.getfixturevalue(f"tiny_{family}_dir"))
    with pytest.raises(ValueError, match=match):
        ControlNetAdapter.from_base(base, SEG)


def test_class_labels_errors(tiny_dit_dir, tiny_sd_dir):
    dit = ours(tiny_dit_dir)
    with pytest.raises(ValueError, match=r"class_labels: expected integers in 0..999"):
        dit(class_labels=[1001], num_inference_steps=2, output_type="pt").images
    with pytest.raises(ValueError, match="class_labels: got 3 labels for 2 images"):
        dit(class_labels=[1, 2, 3], num_images=2, num_inference_steps=2, output_type="pt").images
    with pytest.raises(ValueError, match="not class-conditional"):
        ours(tiny_sd_dir)(class_labels=[1], num_inference_steps=2, output_type="pt").images


@pytest.mark.parametrize("family", ["sd", "sdxl", "dit", "sd3"])
def test_from_pretrained_with_no_modules_equals_the_family_pipeline_with_its_defaults(family, request):
    """No scheduler swap: the base directory's own scheduler is the default, as in diffusers."""
    import diffusers

    path = request.getfixturevalue(f"tiny_{family}_dir")
    cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "dit": "DiTPipeline",
           "sd3": "StableDiffusion3Pipeline"}[family]
    extra = {"sd": dict(safety_checker=None, requires_safety_checker=False),
             "sd3": dict(text_encoder_3=None, tokenizer_3=None)}.get(family, {})
    ref = getattr(diffusers, cls).from_pretrained(path, **extra)
    ref.set_progress_bar_config(disable=True)
    pipe = MCMPipeline.from_pretrained(path, modules=[])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is type(ref.scheduler)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np")
    cond = {"class_labels": [1, 2]} if family == "dit" else {"prompt": PROMPTS}
    expected = ref(generator=gen(), **cond, **kw).images
    got = pipe(generator=gen(), **cond, **kw).images
    assert abs(got - expected).max() < TOL


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sdxl_controlnet_adapter_equals_stable_diffusion_xl_controlnet_pipeline(tiny_sdxl_dir, guidance_scale):
    import torch.nn.functional as F
    from diffusers import StableDiffusionXLControlNetPipeline

    from mcm.models.controlnet import ControlNetAdapter

    base = FrozenBase.from_pretrained(tiny_sdxl_dir)
    torch.manual_seed(0)
    adapter = ControlNetAdapter.from_base(base, {"segmentation": {"num_classes": 3}})
    assert adapter.controlnet.config.conditioning_embedding_out_channels == (16, 32)  # x2, the tiny VAE's factor
    with torch.no_grad():
        for conv in [*adapter.controlnet.controlnet_down_blocks, adapter.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    adapter.eval()
    ref = StableDiffusionXLControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                              text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                              tokenizer_2=base.tokenizer_2, unet=base.unet,
                                              controlnet=adapter.controlnet, scheduler=base.scheduler,
                                              add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 3, (2, 16, 16), generator=gen())
    control = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    expected = ref(prompt=PROMPTS, image=control, num_inference_steps=3, guidance_scale=guidance_scale,
                   generator=gen(), output_type="pt").images
    pipe = MCMPipeline.from_base(base, [adapter], scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(conditions={"segmentation": labels}, prompt=PROMPTS, num_inference_steps=3,
               guidance_scale=guidance_scale, generator=gen(), output_type="pt").images
    assert float((got - expected).abs().max()) < TOL


def test_controlnet_trains_on_sdxl(tiny_sdxl_dir):
    from mcm.training.controlnet_module import ControlNetModule

    torch.manual_seed(0)
    m = ControlNetModule(base=str(tiny_sdxl_dir), modalities=SEG, warmup_steps=0, lr=1e-3)
    before = m.base.content_hash()
    opt = m.configure_optimizers()["optimizer"]
    m.train()
    zero = m.adapter.controlnet.controlnet_mid_block.weight
    for step in range(2):
        opt.zero_grad()
        loss = m.training_step(family_batch(2), step)
        loss.backward()
        opt.step()
    assert torch.count_nonzero(zero) > 0 and torch.isfinite(loss)
    m.base._hash = None
    assert m.base.content_hash() == before


def test_sd3_controlnet_trains_exports_and_samples(tiny_sd3_dir, tmp_path):
    """SD3ControlNetModel.from_transformer through the same protocol: it trains (the base unchanged), its
    zero-initialised input leaves the base's images exactly at step 0, exports and reloads, and a map of
    ones equals strength 1."""
    from mcm.models.sd3_controlnet import SD3ControlNetAdapter
    from mcm.training.controlnet_module import ControlNetModule

    torch.manual_seed(0)
    # no dropout: with two samples a dropped map (zero input) would leave the input embedding without gradient
    m = ControlNetModule(base=str(tiny_sd3_dir), modalities=SEG, warmup_steps=0, lr=1e-3, modality_dropout=0.0,
                         drop_all_prob=0.0)
    assert isinstance(m.adapter, SD3ControlNetAdapter)
    labels = torch.randint(0, 6, (2, 16, 16), generator=gen())
    kw = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=gen())
    alone = MCMPipeline.from_base(m.base, [])
    alone.set_progress_bar_config(disable=True)
    at_init = MCMPipeline.from_base(m.base, [m.adapter])
    at_init.set_progress_bar_config(disable=True)
    base_images = alone(**kw, output_type="pt").images
    kw["generator"] = gen()
    assert float((at_init(conditions={"segmentation": labels}, **kw, output_type="pt").images - base_images).abs().max()) < 1e-5
    loss, loaded = train_and_export(m, family_batch(2), tmp_path)
    assert torch.isfinite(loss) and torch.count_nonzero(m.adapter.controlnet.pos_embed_input.proj.weight) > 0
    assert isinstance(loaded, SD3ControlNetAdapter)
    pipe = MCMPipeline.from_base(m.base, [loaded])
    pipe.set_progress_bar_config(disable=True)
    run = lambda **extra: pipe(conditions={"segmentation": labels}, prompt=PROMPTS, num_inference_steps=3,  # noqa: E731
                               guidance_scale=3.0, generator=gen(), **extra, output_type="pt").images
    trained = run()
    assert float((trained - base_images).abs().max()) > 1e-4
    assert torch.equal(run(strength=torch.ones(16, 16)), trained)
    assert torch.equal(run(strength=torch.zeros(16, 16)), run(strength=0.0))


def test_flux_controlnet_trains_exports_and_samples(tiny_flux_dir, tmp_path):
    """FluxControlNetModel.from_transformer through the same protocol (issue 27 item 4): it trains (the base
    unchanged), its zero-initialised input leaves FLUX's images exactly at step 0, exports and reloads, and a map of
    ones equals strength 1."""
    from mcm.models.flux_controlnet import FluxControlNetAdapter
    from mcm.training.controlnet_module import ControlNetModule

    torch.manual_seed(0)
    seg = {"segmentation": {"num_classes": 4}}  # 4 one-hot channels: at most the latent's 4 (packed 2x2)
    m = ControlNetModule(base=str(tiny_flux_dir), modalities=seg, warmup_steps=0, lr=1e-3, modality_dropout=0.0,
                         drop_all_prob=0.0)
    assert isinstance(m.adapter, FluxControlNetAdapter)
    labels = torch.randint(0, 4, (2, 32, 32), generator=gen())
    kw = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=32, width=32)
    alone = MCMPipeline.from_base(m.base, [])
    alone.set_progress_bar_config(disable=True)
    at_init = MCMPipeline.from_base(m.base, [m.adapter])
    at_init.set_progress_bar_config(disable=True)
    base_images = alone(**kw, generator=gen(), output_type="pt").images
    got = at_init(conditions={"segmentation": labels}, **kw, generator=gen(), output_type="pt").images
    assert float((got - base_images).abs().max()) < 1e-5
    batch = family_batch(2, size=32)
    batch["segmentation"] = batch["segmentation"] % 4
    loss, loaded = train_and_export(m, batch, tmp_path)
    assert torch.isfinite(loss) and torch.count_nonzero(m.adapter.controlnet.controlnet_x_embedder.weight) > 0
    assert isinstance(loaded, FluxControlNetAdapter)
    pipe = MCMPipeline.from_base(m.base, [loaded])
    pipe.set_progress_bar_config(disable=True)
    run = lambda **extra: pipe(conditions={"segmentation": labels}, **kw, generator=gen(), **extra,  # noqa: E731
                               output_type="pt").images
    trained = run()
    assert float((trained - base_images).abs().max()) > 1e-4
    assert torch.equal(run(strength=torch.ones(32, 32)), trained)
    assert torch.equal(run(strength=torch.zeros(32, 32)), run(strength=0.0))
    with pytest.raises(ValueError, match="at most the latent's 4"):
        FluxControlNetAdapter.from_base(m.base, {"segmentation": {"num_classes": 6}})

