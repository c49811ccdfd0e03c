"""``mcm.attach``: an unmodified diffusers pipeline with an MCM attached gives ``MCMPipeline``'s
images with the same module, seed and arguments, for SD, SDXL, SD3 and DiT, with and without guidance; with no
module the pipeline is untouched, and it is restored on exit, also after an exception."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import mcm
import modalities
from mcm.models.frozen_base import FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline, save_module

TOL = 1e-5
PROMPTS = ["a red circle", "a blue square"]
SEG = {"segmentation": {"num_classes": 6}}
#: family -> (diffusers pipeline, fixture, from_pretrained kwargs, output size (H, W), guidance settings)
FAMILIES = {
    "sd": ("StableDiffusionPipeline", "tiny_sd_dir", dict(safety_checker=None, requires_safety_checker=False),
           (64, 128), (1.0, 7.5)),
    "sdxl": ("StableDiffusionXLPipeline", "tiny_sdxl_dir", {}, (16, 32), (1.0, 5.0)),
    "sd3": ("StableDiffusion3Pipeline", "tiny_sd3_dir", dict(text_encoder_3=None, tokenizer_3=None), (16, 16),
            (1.0, 7.0)),
    "dit": ("DiTPipeline", "tiny_dit_dir", {}, (16, 16), (1.0, 4.0)),
}


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def trained_mcm(base: FrozenBase, size: tuple[int, int], steps: int = 3) -> MultimodalConditioningModule:
    """An MCM after a few AdamW steps of ``MCMModule`` on random images (gamma, beta != 0)."""
    from mcm.training.mcm_module import MCMModule

    torch.manual_seed(0)
    with mock.patch.object(FrozenBase, "from_pretrained", lambda *a, **k: base):
        module = MCMModule(base="tiny", modalities=SEG, block_out_channels=(8, 16), layers_per_block=1,
                           attention_levels=(), norm_num_groups=4, lr=1e-2, warmup_steps=0, modality_dropout=0.0,
                           drop_all_prob=0.0)
    opt = module.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(2, 3, *size, generator=g) * 2 - 1, "caption": PROMPTS,
             "segmentation": modalities.get("segmentation", num_classes=6).example(2, *size, g),
             "class_label": torch.tensor([3, 917])}
    for _ in range(steps):
        loss = module._common_step(batch, "train")
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert module.mcm.unet.conv_out.weight.abs().sum() > 0
    return module.mcm.eval()


def reference(family: str, request):
    import diffusers

    cls, fixture, extra, size, guidance = FAMILIES[family]
    pipe = getattr(diffusers, cls).from_pretrained(request.getfixturevalue(fixture), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe, size, guidance


def call_kwargs(family: str, size: tuple[int, int], guidance_scale: float) -> dict:
    kw = dict(num_inference_steps=3, guidance_scale=guidance_scale, output_type="pt")
    if family == "dit":  # DiTPipeline: class labels, its own size
        return {**kw, "class_labels": [3, 917]}
    return {**kw, "prompt": PROMPTS, "height": size[0], "width": size[1]}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attach_equals_mcm_pipeline(family, request, tmp_path):
    pipe, size, guidance = reference(family, request)
    base = FrozenBase.from_components(source=family, **{k: v for k, v in pipe.components.items() if v is not None})
    module = trained_mcm(base, size)
    save_module(module, tmp_path / "mcm", {"source": family, "hash": base.content_hash()})
    maps = torch.randint(0, 6, (2, *size), generator=gen())
    ours = MCMPipeline.from_pipe(pipe, modules=[tmp_path / "mcm"])
    ours.set_progress_bar_config(disable=True)
    forward, set_timesteps = pipe.__dict__.get("forward"), type(pipe.scheduler).set_timesteps
    for g in guidance:
        kw = call_kwargs(family, size, g)
        plain = pipe(generator=gen(), **kw).images
        want = ours(conditions={"segmentation": maps}, generator=gen(), **kw).images
        with mcm.attach(pipe, modules=[tmp_path / "mcm"], conditions={"segmentation": maps}) as attached:
            assert attached is pipe
            got = pipe(generator=gen(), **kw).images
        assert float((got - want).abs().max()) <= TOL, (family, g)
        assert float((got - plain).abs().max()) > 1e-3, "the attached module changed nothing"
        # restored: the same call gives the plain images again
        assert torch.equal(pipe(generator=gen(), **kw).images, plain)
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    assert "forward" not in vars(denoiser) and pipe.__dict__.get("forward") is forward
    assert "set_timesteps" not in vars(pipe.scheduler) and type(pipe.scheduler).set_timesteps is set_timesteps


def test_composition_regions_scale_and_window_through_attach(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = FrozenBase.from_components(source="sd", **{k: v for k, v in pipe.components.items() if v is not None})
    a, b = trained_mcm(base, (64, 64)), trained_mcm(base, (64, 64), steps=5)
    maps = torch.randint(0, 6, (2, 64, 64), generator=gen())
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    args = dict(conditioning_scale=[1.5, [2.0, 1.0, 0.0]], weights=[1.0, 0.5], regions=[left, 1 - left],
                control_guidance_start=0.0, control_guidance_end=0.7)
    kw = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=7.5, output_type="pt")
    ours = MCMPipeline.from_pipe(pipe, modules=[a, b], weights=args["weights"])
    ours.set_progress_bar_config(disable=True)
    want = ours(conditions={"segmentation": maps}, generator=gen(), **kw,
                **{k: v for k, v in args.items() if k != "weights"}).images
    with mcm.attach(pipe, modules=[a, b], conditions={"segmentation": maps}, **args):
        got = pipe(generator=gen(), **kw).images
        again = pipe(generator=gen(), **kw).images  # a second run in the block: the schedule starts over
    assert float((got - want).abs().max()) <= TOL and torch.equal(got, again)


def test_restored_after_an_exception_and_clear_errors(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    from mcm.models.controlnet import ControlNetAdapter

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = FrozenBase.from_components(source="sd", **{k: v for k, v in pipe.components.items() if v is not None})
    module = trained_mcm(base, (64, 64), steps=1)
    maps = torch.zeros(1, 64, 64, dtype=torch.long)
    with pytest.raises(ValueError, match="the conditions' maps are 64x64 but the pipeline samples at 128x64; call "
                                         "it with height=64, width=64"):
        with mcm.attach(pipe, modules=[module], conditions={"segmentation": maps}):
            pipe(prompt="a ring", height=128, width=64, num_inference_steps=2)
    assert "forward" not in vars(pipe.unet) and "set_timesteps" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match="inject residuals into the denoiser's forward pass"):
        with mcm.attach(pipe, modules=[ControlNetAdapter.from_base(base, SEG)], conditions={"segmentation": maps}):
            pass
    with pytest.raises(ValueError, match="conditions: expected at least one map"):
        with mcm.attach(pipe, modules=[module], conditions={}):
            pass
    with pytest.raises(ValueError, match="has neither a unet nor a transformer"):
        with mcm.attach(object(), modules=[module], conditions={"segmentation": maps}):
            pass
