"""Strength maps, schedules and region masks (issue: regional and scheduled control): identities that
must hold exactly, the formula at one denoising step, the baselines' residual scaling, and clear errors."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import modalities
from mcm.diffusion.control import Control, controlled_predictor
from mcm.diffusion.strength import Strength, parse_strength
from mcm.models.controlnet import ControlNetAdapter
from mcm.models.frozen_base import FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.models.t2i_adapter import T2IAdapterControl
from mcm.pipelines import MCMPipeline

SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)
KW = dict(num_inference_steps=4, seeds=[1, 2])


def make_mcm(mods: dict, seed: int) -> MultimodalConditioningModule:
    torch.manual_seed(seed)
    m = MultimodalConditioningModule(latent_channels=3, modalities=mods, **SMALL)
    with torch.no_grad():
        m.unet.conv_out.weight.normal_(0, 0.05)
        m.unet.conv_out.bias.normal_(0, 0.05)
    return m.eval()


def nudged_controlnet(base, mods, seed):
    torch.manual_seed(seed)
    a = ControlNetAdapter.from_base(base, mods)
    with torch.no_grad():
        for conv in [*a.controlnet.controlnet_down_blocks, a.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    return a.eval()


@pytest.fixture(scope="module")
def setup(tiny_pixel_base_dir):
    base = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    g = torch.Generator().manual_seed(0)
    conds = {"segmentation": modalities.get("segmentation", num_classes=6).example(2, 16, 16, g),
             "sketch": modalities.get("sketch").example(2, 16, 16, g)}
    seg, sketch = make_mcm({"segmentation": {"num_classes": 6}}, 1), make_mcm({"sketch": {}}, 2)
    cn = nudged_controlnet(base, {"sketch": {}}, 3)
    t2i = T2IAdapterControl.from_base(base, {"sketch": {}})
    with torch.no_grad():
        for p in t2i.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return base, seg, sketch, cn, t2i.eval(), conds


def pipe_of(base, modules, weights=None):
    p = MCMPipeline.from_base(base, modules, weights)
    p.set_progress_bar_config(disable=True)
    return p


def test_maps_of_ones_and_zeros_and_constant_schedules(setup):
    base, seg, _, cn, t2i, c = setup
    alone = pipe_of(base, [])(num_images=2, **KW, output_type="pt").images
    for module, cond in ((seg, {"segmentation": c["segmentation"]}), (cn, {"sketch": c["sketch"]}),
                         (t2i, {"sketch": c["sketch"]})):
        pipe = pipe_of(base, [module])
        one = pipe(conditions=cond, strength=1.0, **KW, output_type="pt").images
        assert not torch.allclose(one, alone, atol=1e-3), type(module).__name__
        assert torch.equal(pipe(conditions=cond, strength=torch.ones(16, 16), **KW, output_type="pt").images, one)
        assert torch.equal(pipe(conditions=cond, strength=torch.zeros(2, 16, 16), **KW, output_type="pt").images, alone)
        half = pipe(conditions=cond, strength=0.5, **KW, output_type="pt").images
        assert torch.equal(pipe(conditions=cond, strength=[0.5] * 4, **KW, output_type="pt").images, half)
        assert torch.equal(pipe(conditions=cond, strength=lambda f: 0.5, **KW, output_type="pt").images, half)
        assert torch.equal(pipe(conditions=cond, strength=(np.ones((16, 16)), [0.5] * 4), **KW, output_type="pt").images, half)


def test_strength_map_at_one_step_by_hand(setup):
    """p_hat = p + S(x, y) (p gamma + beta); ControlNet: every residual times S resized to its level."""
    base, seg, _, cn, _, c = setup
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor(500)
    ctx = base.encode_text(["a red circle"] * 2)
    S = torch.zeros(2, 1, 16, 16)
    S[..., :8] = 1.0
    S[1, ..., 8:] = 0.25
    with torch.no_grad():
        p = base.predict(x, t, ctx)
        feats = seg.encode_conditions({"segmentation": c["segmentation"]}, None, (16, 16), 2)
        gamma, beta = seg.modulation(x, p, t, feats)
        got = controlled_predictor(base, [Control(seg, {"segmentation": c["segmentation"]}, 1.0,
                                                  Strength(map=S))], (16, 16))(x, t, ctx)
        torch.testing.assert_close(got, p + S * (p * gamma + beta), rtol=0, atol=1e-6)
        cond = cn.encode_conditions({"sketch": c["sketch"]}, None, (16, 16), 2)
        down, mid = cn.residuals(x, t.expand(2), ctx, cond)
        resize = lambda r: torch.nn.functional.interpolate(S, size=r.shape[-2:], mode="bilinear")  # noqa: E731
        expected = base.predict_with_residuals(x, t, ctx, [r * resize(r) for r in down], mid * resize(mid))
        got_cn = controlled_predictor(base, [Control(cn, {"sketch": c["sketch"]}, 1.0, Strength(map=S))],
                                      (16, 16))(x, t, ctx)
        torch.testing.assert_close(got_cn, expected, rtol=0, atol=1e-6)


def test_regions_exact_outside_and_ones_equal_unmasked(setup):
    base, seg, sketch, _, _, c = setup
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor(700)
    ctx = base.encode_text([""] * 2)
    left = torch.zeros(1, 1, 16, 16)
    left[..., :8] = 1.0
    with torch.no_grad():
        p_u = base.predict(x, t, ctx)
        conds = [{"segmentation": c["segmentation"]}, {"sketch": c["sketch"]}]
        plain = controlled_predictor(base, [Control(seg, conds[0], 0.7), Control(sketch, conds[1], 1.3)],
                                     (16, 16))(x, t, ctx)
        ones = controlled_predictor(base, [Control(seg, conds[0], 0.7, None, torch.ones(1, 1, 16, 16)),
                                           Control(sketch, conds[1], 1.3, None, torch.ones(1, 1, 16, 16))],
                                    (16, 16))(x, t, ctx)
        assert torch.equal(ones, plain)
        regional = controlled_predictor(base, [Control(seg, conds[0], 1.0, None, left),
                                               Control(sketch, conds[1], 1.0, None, 1 - left)], (16, 16))(x, t, ctx)
        p_a = controlled_predictor(base, [Control(seg, conds[0])], (16, 16))(x, t, ctx)
        p_b = controlled_predictor(base, [Control(sketch, conds[1])], (16, 16))(x, t, ctx)
        torch.testing.assert_close(regional, p_u + left * (p_a - p_u) + (1 - left) * (p_b - p_u), rtol=0, atol=1e-6)
        only_left = controlled_predictor(base, [Control(seg, conds[0], 1.0, None, left)], (16, 16))(x, t, ctx)
        assert torch.equal(only_left[..., 8:], p_u[..., 8:])  # outside a hard region: the base, exactly


def test_outside_a_hard_region_the_base_at_every_step(setup):
    base, seg, _, _, _, c = setup
    pipe = pipe_of(base, [seg])
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    base_steps, region_steps = [], []
    pipe_of(base, [])(num_images=2, callback_on_step_end=lambda p, i, t, kw: base_steps.append(kw["latents"]), **KW, output_type="pt").images
    pipe(conditions={"segmentation": c["segmentation"]}, regions=[left],
         callback_on_step_end=lambda p, i, t, kw: region_steps.append(kw["latents"]), **KW, output_type="pt").images
    # the right half follows the base alone step by step only while the left half has not leaked into it
    # through the UNet's receptive field; at the first step it is exact
    assert torch.equal(region_steps[0][..., 8:], base_steps[0][..., 8:])
    assert not torch.equal(region_steps[0][..., :8], base_steps[0][..., :8])


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=torch.ones(8, 8)), r"strength: expected a map of 16x16 \(the output size\), got \(8, 8\)"),
    (dict(strength=torch.ones(3, 16, 16)), r"strength: expected 1 or 2 maps \(the batch\), got 3"),
    (dict(strength=torch.full((16, 16), float("nan"))), "strength: expected finite values"),
    (dict(strength=-torch.ones(16, 16)), r"strength: expected values in \[0.0, inf\]"),
    (dict(strength=[1.0, 1.0]), "strength: a schedule list needs one value per inference step \\(4\\), got 2"),
    (dict(strength=lambda f: -1.0), "strength: a schedule must be >= 0"),
    (dict(strength=float("inf")), "strength: expected a finite number"),
    (dict(strength="strong"), "strength: expected a float, a map"),
    (dict(regions=[torch.full((16, 16), 1.5)]), r"regions\[0\]: expected values in \[0.0, 1.0\], got values in \[1.5, 1.5\]"),
    (dict(regions=[torch.ones(16, 16), None]), "regions: expected a list of 1 masks"),
    (dict(regions=torch.ones(16, 16)), "regions: expected a list of 1 masks"),
])
def test_bad_maps_schedules_and_regions_name_the_argument(setup, kwargs, match):
    base, seg, _, _, _, c = setup
    with pytest.raises(ValueError, match=match):
        pipe_of(base, [seg])(conditions={"segmentation": c["segmentation"]}, **{**KW, **kwargs}, output_type="pt").images


SCHEDULERS = [  # (class, config overrides, the step of each model evaluation for 4 inference steps)
    ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 0}, [0, 1, 2, 3]),  # 750/500/250/0
    ("DDIMScheduler", {"timestep_spacing": "trailing"}, [0, 1, 2, 3]),
    ("DDIMScheduler", {"timestep_spacing": "linspace"}, [0, 1, 2, 3]),
    ("EulerDiscreteScheduler", {}, [0, 1, 2, 3]),
    ("DPMSolverMultistepScheduler", {}, [0, 1, 2, 3]),
    ("HeunDiscreteScheduler", {}, [0, 0, 1, 1, 2, 2, 3]),  # two evaluations per step (the last is Euler)
    ("KDPM2DiscreteScheduler", {}, [0, 0, 1, 1, 2, 2, 3]),
    ("PNDMScheduler", {"skip_prk_steps": True}, [0, 0, 1, 2, 3]),  # PLMS warm-up: step 0 evaluated twice
    ("PNDMScheduler", {"skip_prk_steps": False}, [0] * 4 + [1] * 4 + [2] * 4 + [3]),  # Runge-Kutta warm-up
]


@pytest.mark.parametrize("name,overrides,expected", SCHEDULERS, ids=[f"{n}-{o}" for n, o, _ in SCHEDULERS])
def test_schedule_list_value_i_at_step_i_with_real_schedulers(setup, name, overrides, expected):
    """Regression (issue: scale schedule one step late): with DDIM's leading spacing (timesteps 750/500/250/0 for 4
    steps) the list was bucketed on ``1 - t/T`` and ``[4, 3, 2, 1]`` acted as ``[3, 2, 1, 1]``.  Through the
    pipeline, with each real scheduler, the strength of every model evaluation is the value of its step; a
    callable still gets ``t / T``."""
    import diffusers

    base, seg, _, _, _, c = setup
    pipe = pipe_of(base, [seg])
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    seen: list[tuple[float, float]] = []
    real = seg.controlled_prediction

    def spy(base_, x, t, context, state, strength, *args, **kwargs):
        seen.append((float(t), float(strength)))
        return real(base_, x, t, context, state, strength, *args, **kwargs)

    schedule = [4.0, 3.0, 2.0, 1.0]
    with mock.patch.object(seg, "controlled_prediction", side_effect=spy):
        pipe(conditions={"segmentation": c["segmentation"]}, num_inference_steps=4, seeds=[1, 2], strength=schedule, output_type="pt").images
        assert [s for _, s in seen] == [schedule[i] for i in expected]
        seen.clear()
        pipe(conditions={"segmentation": c["segmentation"]}, num_inference_steps=4, seeds=[1, 2],
             strength=lambda f: 10 * f, output_type="pt").images
    T = pipe.scheduler.config.num_train_timesteps
    assert [s for _, s in seen] == pytest.approx([10 * t / T for t, _ in seen])
    assert len(seen) == len(expected)


def test_schedule_list_first_and_last_values_change_the_image(setup):
    """With DDIM leading, ``[2, 0, 0, 0]`` differs from the base alone and ``[0, 0, 0, 2]`` from ``[0, 0, 2, 0]``
    (before the fix the first value was never used and the last two steps shared one value)."""
    import diffusers

    base, seg, _, _, _, c = setup
    pipe = pipe_of(base, [seg])
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading",
                                                         steps_offset=0)
    run = lambda s: pipe(conditions={"segmentation": c["segmentation"]}, strength=s, output_type="pt", **KW).images  # noqa: E731
    out = {tuple(s): run(s) for s in ([0.0] * 4, [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 2.0])}
    out = {k: (v.images if hasattr(v, "images") else v) for k, v in out.items()}
    assert (out[(2.0, 0, 0, 0)] - out[(0.0,) * 4]).abs().max() > 1e-4
    assert (out[(0, 0, 0, 2.0)] - out[(0, 0, 2.0, 0)]).abs().max() > 1e-4


def test_schedule_list_outside_a_sampling_loop_is_refused():
    s = parse_strength([4.0, 3.0, 2.0, 1.0], "strength", 1, (8, 8), (8, 8), 4)
    assert [s.at(0.5, 1, step=i) for i in range(4)] == [4.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="read by inference step"):
        s.at(0.5, 1)


def test_mcm_sample_regions_strength_map_and_schedule(tmp_path):
    """``mcm sample --regions a.png b.png`` with the two shipped compose modules; bad counts are refused."""
    from PIL import Image

    from mcm.cli.tool_commands import run_tool_command

    seg = np.zeros((32, 32), np.uint8)
    seg[8:24, 4:14] = 2
    sketch = np.zeros((32, 32), np.uint8)
    sketch[10:22, 22] = 255
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    for name, arr in (("seg", seg), ("sk", sketch), ("left", left), ("right", 255 - left)):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    common = ["sample", "--mcm", "shapes32_compose_segmentation", "shapes32_compose_sketch", "--steps", "3",
              "--cond", f"0:segmentation={tmp_path / 'seg.png'}", f"1:sketch={tmp_path / 'sk.png'}"]
    outs = {}
    for tag, extra in (("plain", []), ("regions", ["--regions", str(tmp_path / "left.png"), str(tmp_path / "right.png")]),
                       ("map", ["--strength-map", str(tmp_path / "left.png"), "--strength-schedule", "1,1,0"])):
        out = tmp_path / f"{tag}.png"
        assert run_tool_command([*common, *extra, "--out", str(out)]) == 0
        outs[tag] = np.asarray(Image.open(out), dtype=np.float32)
    assert outs["plain"].shape == outs["regions"].shape
    assert np.abs(outs["plain"] - outs["regions"]).max() > 10 and np.abs(outs["plain"] - outs["map"]).max() > 10
    with pytest.raises(ValueError, match="--regions: got 1 masks for 2"):
        run_tool_command([*common, "--regions", str(tmp_path / "left.png"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="--strength-schedule"):
        run_tool_command([*common, "--strength-schedule", "1,a", "--out", str(tmp_path / "x.png")])


def test_mcm_demo_takes_a_schedule_a_map_and_a_window(tmp_path):
    from PIL import Image

    from mcm.cli.tool_commands import run_tool_command

    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save(tmp_path / "left.png")
    outs = {}
    for tag, extra in (("plain", []), ("schedule", ["--strength-schedule", "1,1,0", "--window", "0.5", "1"]),
                       ("map", ["--strength-map", str(tmp_path / "left.png")])):
        out = tmp_path / f"{tag}.png"
        assert run_tool_command(["demo", "--n", "2", "--steps", "3", *extra, "--out", str(out)]) == 0
        outs[tag] = np.asarray(Image.open(out), dtype=np.float32)
    tiles = {k: v[:, -256:] for k, v in outs.items()}  # the image columns (the label column's width varies)
    assert np.abs(tiles["plain"] - tiles["schedule"]).max() > 10 and np.abs(tiles["plain"] - tiles["map"]).max() > 10
