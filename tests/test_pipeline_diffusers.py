"""``MCMPipeline`` behaves as a diffusers pipeline (issue: architecture): save_pretrained/from_pretrained of
the whole directory, from_pipe without copies, callback_on_step_end, output types, scheduler swaps, strength=None."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from mcm.models.frozen_base import BaseMismatchError, FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline

SEG = {"segmentation": {"num_classes": 3}}


def mcm(seed: int, default_strength: float = 1.0) -> MultimodalConditioningModule:
    torch.manual_seed(seed)
    m = MultimodalConditioningModule(latent_channels=4, modalities=SEG, downsample=8, block_out_channels=(16, 32),
                                     layers_per_block=1, attention_levels=(), norm_num_groups=8,
                                     default_strength=default_strength)
    with torch.no_grad():
        m.unet.conv_out.weight.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    base = FrozenBase.from_pretrained(tiny_sd_dir)
    p = MCMPipeline.from_base(base, [mcm(1, 1.5), mcm(2)], weights=[1.0, 0.5],
                              scheduler=DDIMScheduler.from_config(base.scheduler.config))
    p.set_progress_bar_config(disable=True)
    return p


LABELS = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(0))
KW = dict(conditions={"segmentation": LABELS}, prompt="a red circle", num_inference_steps=3, seeds=[0, 1],
          output_type="pt")


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "MCMPipeline" and index["adapters"] == ["mcm.pipelines.adapter_stack", "AdapterStack"]
    loaded = MCMPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.weights == [1.0, 0.5] and [m.default_strength for m in loaded.modules] == [1.5, 1.0]
    assert torch.equal(loaded(**KW).images, pipe(**KW).images)


def test_from_pipe_shares_components_and_equals_the_base(tiny_sd_dir):
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = MCMPipeline.from_pipe(sd, modules=[mcm(3)])
    ours.set_progress_bar_config(disable=True)
    assert ours.unet is sd.unet and ours.vae is sd.vae and ours.text_encoder is sd.text_encoder
    assert ours.scheduler is sd.scheduler  # diffusers' from_pipe keeps the scheduler too
    ref = sd(prompt=["a red circle"] * 2, num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
             output_type="pt").images
    got = ours(conditions={}, prompt=["a red circle"] * 2, num_inference_steps=3, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert float((got - ref).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="unet"):
        MCMPipeline.from_pipe(type("P", (), {"components": {"scheduler": sd.scheduler}})())


def test_strength_none_uses_each_adapters_default_and_a_float_overrides(pipe):
    a, b = pipe.modules
    ref = MCMPipeline.from_base(pipe.base, [a, b], weights=[1.0, 0.5], scheduler=pipe.scheduler)
    ref.set_progress_bar_config(disable=True)
    assert torch.equal(pipe(**KW).images, ref(strength=[1.5, 1.0], **KW).images)
    assert torch.equal(pipe(strength=1.0, **KW).images, ref(strength=[1.0, 1.0], **KW).images)
    assert not torch.allclose(pipe(**KW).images, pipe(strength=1.0, **KW).images, atol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        pipe(strength=[1.0], **KW).images


def test_callback_on_step_end_and_output_types(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append((i, int(t)))
        return {"latents": kwargs["latents"] * 0} if i == 2 else kwargs

    kw = {k: v for k, v in KW.items() if k != "output_type"}
    out = pipe(callback_on_step_end=cb, output_type="latent", **kw).images
    assert [i for i, _ in seen] == [0, 1, 2] and torch.equal(out, torch.zeros_like(out))
    pt, np_, pil = (pipe(output_type=o, **kw).images for o in ("pt", "np", "pil"))
    assert pt.shape == (2, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    assert np_.shape == (2, 64, 64, 3) and np.allclose(np_, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg", **kw)


def test_scheduler_swap_and_base_mismatch(pipe, tiny_sd_dir, tmp_path):
    pipe2 = MCMPipeline.from_base(pipe.base, pipe.modules, pipe.weights)
    pipe2.set_progress_bar_config(disable=True)
    pipe2.scheduler = EulerDiscreteScheduler.from_config(pipe2.scheduler.config)
    assert pipe2.base.scheduler is pipe2.scheduler
    assert pipe2(**KW).images.shape == (2, 3, 64, 64)
    from mcm.pipelines import save_module

    save_module(mcm(4), tmp_path / "m", {"source": "other", "hash": "0" * 64})
    with pytest.raises(BaseMismatchError, match="sha256"):
        MCMPipeline.from_pretrained(tiny_sd_dir, modules=[tmp_path / "m"])
    assert MCMPipeline.from_pretrained(tiny_sd_dir, modules=[tmp_path / "m"], force_base=True).modules
