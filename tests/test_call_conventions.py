"""``MCMPipeline.__call__`` follows diffusers' conventions: with ``height`` /
``width`` (non-square, not the base's default), ``num_images_per_prompt=2`` and the default guidance, our pipeline
equals the family's diffusers pipeline called with the same arguments, with no control and with a zero-initialised
MCM; ``.images`` / ``return_dict=False``; the earlier names ``strength`` / ``modulation_window`` still work, with a
deprecation warning, and mean what ``conditioning_scale`` / ``control_guidance_start/end`` mean."""
from __future__ import annotations

import pytest
import torch

from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline, MCMPipelineOutput

TOL = 1e-5
PROMPTS = ["a red circle", "a blue square"]
SEG = {"segmentation": {"num_classes": 6}}
#: family -> (diffusers pipeline class, fixture, extra from_pretrained kwargs, (height, width) != the default)
FAMILIES = {
    "sd": ("StableDiffusionPipeline", "tiny_sd_dir", dict(safety_checker=None, requires_safety_checker=False),
           (64, 128)),
    "sdxl": ("StableDiffusionXLPipeline", "tiny_sdxl_dir", {}, (16, 32)),
    "sd3": ("StableDiffusion3Pipeline", "tiny_sd3_dir", dict(text_encoder_3=None, tokenizer_3=None), (32, 16)),
}


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def mcm_for(base, nudge: bool = False) -> MultimodalConditioningModule:
    torch.manual_seed(0)
    m = MultimodalConditioningModule(latent_channels=base.latent_channels, modalities=SEG, downsample=base.downsample,
                                     block_out_channels=(16, 32), layers_per_block=1, attention_levels=(),
                                     norm_num_groups=8)
    if nudge:  # gamma, beta != 0
        with torch.no_grad():
            m.unet.conv_out.weight.normal_(0, 0.05)
    return m.eval()


def pair(family: str, request):
    import diffusers

    cls, fixture, extra, size = FAMILIES[family]
    path = request.getfixturevalue(fixture)
    ref = getattr(diffusers, cls).from_pretrained(path, **extra)
    ref.set_progress_bar_config(disable=True)
    ours = MCMPipeline.from_pretrained(path, modules=[])
    ours.set_progress_bar_config(disable=True)
    return ref, ours, size


@pytest.mark.parametrize("family", list(FAMILIES))
def test_height_width_images_per_prompt_and_default_guidance_equal_diffusers(family, request):
    ref, ours, (H, W) = pair(family, request)
    assert (H, W) != tuple(s * ours.base.downsample for s in ours.base.sample_size)
    kw = dict(prompt=PROMPTS, height=H, width=W, num_images_per_prompt=2, num_inference_steps=3, output_type="pt")
    expected = ref(generator=gen(), **kw).images  # the family's default guidance on both sides
    assert expected.shape == (4, 3, H, W)
    got = ours(generator=gen(), **kw)
    assert isinstance(got, MCMPipelineOutput) and got.images.shape == (4, 3, H, W)
    assert float((got.images - expected).abs().max()) < TOL
    # a zero-initialised MCM with maps of that size (one per prompt): the same images
    zero = MCMPipeline.from_base(ours.base, [mcm_for(ours.base)], scheduler=ours.scheduler)
    zero.set_progress_bar_config(disable=True)
    maps = torch.randint(0, 6, (2, H, W), generator=gen())
    got = zero(conditions={"segmentation": maps}, generator=gen(), **kw).images
    assert float((got - expected).abs().max()) < TOL
    # and a trained-looking one changes them: the maps reach every image of each prompt
    moved = MCMPipeline.from_base(ours.base, [mcm_for(ours.base, nudge=True)], scheduler=ours.scheduler)
    moved.set_progress_bar_config(disable=True)
    assert float((moved(conditions={"segmentation": maps}, generator=gen(), **kw).images - expected).abs().max()) > 1e-3


def test_dit_default_guidance_equals_dit_pipeline(tiny_dit_dir):
    """DiT: ``DiTPipeline`` takes no height / width / num_images_per_prompt; the default guidance (4.0) is its."""
    from diffusers import DiTPipeline

    ref = DiTPipeline.from_pretrained(tiny_dit_dir)
    ref.set_progress_bar_config(disable=True)
    ours = MCMPipeline.from_pretrained(tiny_dit_dir, modules=[])
    ours.set_progress_bar_config(disable=True)
    expected = ref(class_labels=[3, 917], num_inference_steps=3, generator=gen(), output_type="np").images
    got = ours(class_labels=[3, 917], num_inference_steps=3, generator=gen(), output_type="np").images
    assert abs(got - expected).max() < TOL
    assert ours.base.default_guidance_scale == 4.0


def test_outputs_return_dict_and_sizes(tiny_sd_dir):
    pipe = MCMPipeline.from_pretrained(tiny_sd_dir, modules=[])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a ring", num_inference_steps=2, seeds=[3])
    pil = pipe(**kw).images  # output_type="pil" by default, as diffusers
    assert len(pil) == 1 and pil[0].size == (64, 64)
    (pt,) = pipe(output_type="pt", return_dict=False, **kw)
    assert pt.shape == (1, 3, 64, 64)
    assert pipe(output_type="pt", height=128, width=64, **kw).images.shape == (1, 3, 128, 64)
    with pytest.raises(ValueError, match="height: expected a positive multiple of 8"):
        pipe(height=60, **kw)
    with pytest.raises(ValueError, match="num_images_per_prompt: expected a positive integer"):
        pipe(num_images_per_prompt=0, **kw)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['modulation'\\]"):
        pipe(modulation=1.0, **kw)


def test_conditions_decide_the_size_and_must_agree_with_height_width(tiny_sd_dir):
    pipe = MCMPipeline.from_pretrained(tiny_sd_dir, modules=[])
    zero = MCMPipeline.from_base(pipe.base, [mcm_for(pipe.base)])
    zero.set_progress_bar_config(disable=True)
    maps = torch.zeros(1, 64, 128, dtype=torch.long)
    out = zero(conditions={"segmentation": maps}, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match="height/width: 64x64 given, but the conditions' maps are 64x128"):
        zero(conditions={"segmentation": maps}, height=64, width=64, num_inference_steps=2)


def test_earlier_names_still_work_with_a_deprecation_warning(tiny_sd_dir):
    pipe = MCMPipeline.from_pretrained(tiny_sd_dir, modules=[])
    moved = MCMPipeline.from_base(pipe.base, [mcm_for(pipe.base, nudge=True)])
    moved.set_progress_bar_config(disable=True)
    kw = dict(conditions={"segmentation": torch.randint(0, 6, (2, 64, 64), generator=gen())}, prompt="a ring",
              num_inference_steps=4, seeds=[1, 2], output_type="pt")
    new = moved(conditioning_scale=2.0, control_guidance_start=0.25, control_guidance_end=1.0, **kw).images
    with pytest.warns(FutureWarning, match="strength"):
        old = moved(strength=2.0, **kw).images
    assert torch.equal(old, moved(conditioning_scale=2.0, **kw).images)
    with pytest.warns(FutureWarning, match="modulation_window"):
        old = moved(conditioning_scale=2.0, modulation_window=(0.0, 0.75), **kw).images
    assert torch.equal(old, new)
    assert not torch.equal(new, moved(conditioning_scale=2.0, **kw).images)  # the window does switch steps off
    with pytest.raises(ValueError, match="strength and conditioning_scale: give one"):
        moved(strength=1.0, conditioning_scale=1.0, **kw)
    with pytest.raises(ValueError, match="strength: expected a finite number"), pytest.warns(FutureWarning):
        moved(strength=float("nan"), **kw)  # the error names the argument the caller wrote
    with pytest.raises(ValueError, match="control_guidance_start: expected <= control_guidance_end"):
        moved(control_guidance_start=0.8, control_guidance_end=0.2, **kw)


def test_cli_flags_have_one_name_for_modules_and_keep_the_old_ones(tmp_path):
    """``--modules`` everywhere (``--mcm`` / ``--model`` stay as aliases), ``--conditioning-scale`` (``--strength``),
    and ``mcm sample --height --width`` for the base alone."""
    import argparse

    from PIL import Image

    from mcm.cli import app, demo, sample_command
    from mcm.cli.tool_commands import run_tool_command
    from mcm.evaluation import evaluate

    for command in (sample_command, evaluate, demo, app):
        sub = argparse.ArgumentParser().add_subparsers()
        command.add_command(sub)
        parser = next(iter(sub.choices.values()))
        flags = {o for a in parser._actions for o in a.option_strings}
        assert "--modules" in flags, command.__name__
        if command in (sample_command, evaluate, demo):
            assert {"--conditioning-scale", "--strength"} <= flags, command.__name__
    out = tmp_path / "base.png"
    assert run_tool_command(["sample", "--steps", "2", "--height", "32", "--width", "64", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 64  # one 32x64 image per seed in the grid
    import numpy as np

    seg = np.zeros((32, 32), np.uint8)
    seg[8:24, 8:20] = 2
    Image.fromarray(seg).save(tmp_path / "seg.png")
    common = ["--cond", f"segmentation={tmp_path / 'seg.png'}", "--steps", "2"]
    new, old = tmp_path / "new.png", tmp_path / "old.png"
    assert run_tool_command(["sample", "--modules", "shapes32", "--conditioning-scale", "1.5", *common,
                             "--out", str(new)]) == 0
    assert run_tool_command(["sample", "--mcm", "shapes32", "--strength", "1.5", *common, "--out", str(old)]) == 0
    assert np.array_equal(np.asarray(Image.open(new)), np.asarray(Image.open(old)))


def test_device_auto_is_the_gpu_when_there_is_one():
    from unittest import mock

    from datamodules.devices import resolve_device

    with mock.patch("torch.cuda.is_available", return_value=False):
        assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device: expected auto, cpu, cuda or cuda:N, got 'gpu0'"):
        resolve_device("gpu0")


def test_precision_null_is_bf16_mixed_on_a_gpu_and_fp32_on_the_cpu():
    from mcm.cli.lightning_cli import default_precision

    assert default_precision("auto", cuda_available=True) == "bf16-mixed"
    assert default_precision("gpu", cuda_available=True) == "bf16-mixed"
    assert default_precision("auto", cuda_available=False) == "32-true"
    assert default_precision("cpu", cuda_available=True) == "32-true"


def test_a_trainer_block_without_a_checkpoint_gets_one_back(tmp_path, monkeypatch, caplog):
    """A user's own ``trainer:`` block replaces the experiment's callbacks: ``mcm fit`` adds back the checkpoint
    that ``--ckpt_path last`` resumes from, saying so in one line."""
    import logging

    from mcm.cli.lightning_cli import required_checkpoint

    with caplog.at_level(logging.INFO, logger="mcm.cli.lightning_cli"):
        ckpt = required_checkpoint({"default_root_dir": str(tmp_path / "run"), "val_check_interval": 50})
    assert ckpt.save_last and ckpt.dirpath == str(tmp_path / "run" / "checkpoints")
    assert ckpt._every_n_train_steps == 50 and "added one keeping last.ckpt" in caplog.text
    assert required_checkpoint({"val_check_interval": 0.5})._every_n_train_steps == 1000


def test_mcm_sample_makes_one_image_from_your_own_map(tmp_path):
    """The README's last step: ``mcm sample --modules EXPORT --cond segmentation=my_map.png --prompt ... --out``
    writes the image itself, at the base's default size or at ``--height/--width`` (the map resized to it)."""
    import numpy as np
    from PIL import Image

    from mcm.cli.tool_commands import run_tool_command

    seg = np.zeros((48, 40), np.uint8)  # not the base's size: resized (nearest) to the output size
    seg[10:30, 8:24] = 2
    Image.fromarray(seg).save(tmp_path / "my_map.png")
    common = ["sample", "--modules", "shapes32", "--cond", f"segmentation={tmp_path / 'my_map.png'}",
              "--prompt", "a blue square", "--steps", "3"]
    assert run_tool_command([*common, "--out", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert run_tool_command([*common, "--height", "64", "--width", "32", "--out", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (32, 64)


def test_the_frozen_base_runs_in_bf16_on_a_gpu_by_default():
    import torch

    from mcm.training.adapter_module import resolve_base_dtype

    assert resolve_base_dtype("auto", cuda_available=True) is torch.bfloat16
    assert resolve_base_dtype("auto", cuda_available=False) is None  # fp32 on the CPU: nothing changes here
    assert resolve_base_dtype("float16", cuda_available=False) is torch.float16
    assert resolve_base_dtype(None, cuda_available=True) is None
    with pytest.raises(ValueError, match="base_dtype: expected auto, float32, bfloat16, float16 or null, got 'int8'"):
        resolve_base_dtype("int8", cuda_available=True)
