"""Composition across modules (MCDM, docs/concepts.md#composition): ``p_c = p_u + sum_i w_i (p_i - p_u)`` with each
module's own conditions; identities (one module at weight 1 = plain sampling, weights 0 = the
base), the formula at the denoiser, order invariance, MCM + ControlNet mixes, ``mcm sample``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import modalities
from mcm.models.controlnet import ControlNetAdapter
from mcm.models.frozen_base import FrozenBase
from mcm.diffusion.control import Control, controlled_predictor
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline, save_module
from mcm.cli.tool_commands import run_tool_command

SEG, SKETCH = {"segmentation": {"num_classes": 6}}, {"sketch": {}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)
KW = dict(num_inference_steps=3, seeds=[1, 2])


def make_mcm(mods: dict, seed: int) -> MultimodalConditioningModule:
    torch.manual_seed(seed)
    m = MultimodalConditioningModule(latent_channels=3, modalities=mods, **SMALL)
    with torch.no_grad():  # off the zero init, so each module changes the prediction
        m.unet.conv_out.weight.normal_(0, 0.05)
    return m.eval()


def make_controlnet(base: FrozenBase, mods: dict, seed: int) -> ControlNetAdapter:
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
    return base, make_mcm(SEG, 1), make_mcm(SKETCH, 2), conds


def test_single_module_weight_one_is_plain_sampling_and_weights_zero_the_base(setup):
    base, seg, sketch, c = setup
    plain = MCMPipeline.from_base(base, [seg])(conditions={"segmentation": c["segmentation"]}, **KW, output_type="pt").images
    # weight 1 alone takes the fast path; a region of ones forces the general p_u + 1 * R * (p_1 - p_u): two code
    # paths that must agree
    one = MCMPipeline.from_base(base, [seg], weights=[1.0])(conditions=[{"segmentation": c["segmentation"]}],
                                                            regions=[torch.ones(16, 16)], **KW, output_type="pt").images
    assert torch.allclose(one, plain, atol=1e-5)
    alone = MCMPipeline.from_base(base, [])(conditions={}, num_images=2, **KW, output_type="pt").images
    zero = MCMPipeline.from_base(base, [seg, sketch], weights=[0.0, 0.0])
    assert torch.equal(zero(conditions=[{"segmentation": c["segmentation"]}, {"sketch": c["sketch"]}], **KW, output_type="pt").images, alone)
    assert not torch.allclose(plain, alone)


def test_hook_computes_the_weighted_sum_of_differences(setup):
    """At one denoising step: p_c == p_u + w_a (p_a - p_u) + w_b (p_b - p_u), each module with its own maps."""
    base, seg, sketch, c = setup
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor(500)
    ctx = base.encode_text(["a red circle"] * 2)
    p_u = base.predict(x, t, ctx)

    def run(controls):
        with torch.no_grad():
            return controlled_predictor(base, controls, (16, 16))(x, t, ctx)

    p_a = run([Control(seg, {"segmentation": c["segmentation"]})])
    p_b = run([Control(sketch, {"sketch": c["sketch"]})])
    p_c = run([Control(seg, {"segmentation": c["segmentation"]}, 0.7), Control(sketch, {"sketch": c["sketch"]}, 1.5)])
    assert torch.allclose(p_c, p_u + 0.7 * (p_a - p_u) + 1.5 * (p_b - p_u), atol=1e-6)
    assert not torch.allclose(p_a, p_b)


def test_order_invariance_and_own_conditions(setup):
    base, seg, sketch, c = setup
    ab = MCMPipeline.from_base(base, [seg, sketch], weights=[1.0, 0.5])(
        conditions=[{"segmentation": c["segmentation"]}, {"sketch": c["sketch"]}], **KW, output_type="pt").images
    ba = MCMPipeline.from_base(base, [sketch, seg], weights=[0.5, 1.0])(
        conditions=[{"sketch": c["sketch"]}, {"segmentation": c["segmentation"]}], **KW, output_type="pt").images
    assert torch.allclose(ab, ba, atol=1e-5)
    only_seg = MCMPipeline.from_base(base, [seg])(conditions={"segmentation": c["segmentation"]}, **KW, output_type="pt").images
    assert not torch.allclose(ab, only_seg, atol=1e-4), "the sketch module should contribute"
    with pytest.raises(ValueError, match="sketch"):  # each module only takes its own modalities
        MCMPipeline.from_base(base, [seg, sketch])(conditions=[{"sketch": c["sketch"]}, {"sketch": c["sketch"]}], **KW, output_type="pt").images


def test_mcm_and_controlnet_compose(setup):
    base, seg, _, c = setup
    cn = make_controlnet(base, SKETCH, 4)
    conds = [{"segmentation": c["segmentation"]}, {"sketch": c["sketch"]}]
    mixed = MCMPipeline.from_base(base, [seg, cn], weights=[1.0, 1.0])(conditions=conds, **KW, output_type="pt").images
    swapped = MCMPipeline.from_base(base, [cn, seg], weights=[1.0, 1.0])(conditions=conds[::-1], **KW, output_type="pt").images
    assert torch.isfinite(mixed).all() and torch.allclose(mixed, swapped, atol=1e-5)
    # the single-ControlNet fast path (no separate base call) equals the general composition hook
    fast = MCMPipeline.from_base(base, [cn])(conditions={"sketch": c["sketch"]}, **KW, output_type="pt").images
    general = MCMPipeline.from_base(base, [cn, cn], weights=[1.0, 0.0])(conditions=[conds[1], conds[1]], **KW, output_type="pt").images
    assert torch.allclose(fast, general, atol=1e-5)
    alone = MCMPipeline.from_base(base, [])(conditions={}, num_images=2, **KW, output_type="pt").images
    assert torch.equal(MCMPipeline.from_base(base, [seg, cn], weights=[0.0, 0.0])(conditions=conds, **KW, output_type="pt").images, alone)
    # guidance with an MCM and a ControlNet composed, at one step, against the combination written out: in each
    # branch q = p + (p_mcm - p) + (p_cn - p), then q_u + w (q_c - q_u)
    from mcm.diffusion.sampling import guided

    x, t, w = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)), torch.tensor(400), 2.0
    cond, uncond = base.encode_context(["a red circle"] * 2, None, 2), base.uncond_context(2)
    controls = [Control(seg, conds[0]), Control(cn, conds[1])]
    s_seg, s_cn = seg.encode_conditions(conds[0], None, (16, 16), 2), cn.encode_conditions(conds[1], None, (16, 16), 2)
    with torch.no_grad():
        got = guided(controlled_predictor(base, controls, (16, 16)), cond, uncond, w)(x, t)

        def q(ctx):
            p = base.predict(x, t, ctx)
            p_mcm = seg.controlled_prediction(base, x, t, ctx, s_seg, 1.0, lambda: p)
            p_cn = cn.controlled_prediction(base, x, t, ctx, s_cn, 1.0, lambda: p)
            return p + (p_mcm - p) + (p_cn - p)

        q_u, q_c = q(uncond), q(cond)
    torch.testing.assert_close(got, q_u + w * (q_c - q_u), rtol=0, atol=5e-5)
    assert (q_c - q_u).abs().mean() > 1e-3, "the prompt matters (guidance is not a no-op here)"


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    base, seg, sketch, c = setup
    root = tmp_path_factory.mktemp("compose")
    a, b = save_module(seg, root / "seg", base), save_module(sketch, root / "sketch", base)
    cn = save_module(make_controlnet(base, SEG, 5), root / "cn_seg", base)
    Image.fromarray(c["segmentation"][0].numpy().astype(np.uint8)).save(root / "seg.png")
    Image.fromarray((c["sketch"][0, 0].numpy() * 255).astype(np.uint8)).save(root / "sketch.png")
    photo = np.zeros((16, 16, 3), np.uint8)
    photo[4:12, 4:12] = (230, 20, 20)  # a red square on black: edges to derive a sketch from
    Image.fromarray(photo).save(root / "photo.png")
    return root, a, b, cn


def test_cli_sample_composes_modules_from_files(exported, tmp_path):
    root, a, b, cn = exported
    out = tmp_path / "grid.png"
    assert run_tool_command(["sample", "--mcm", str(a), str(b), str(cn), "--weights", "1", "0.5", "0.5",
                             "--cond", f"segmentation={root / 'seg.png'}", f"1:sketch={root / 'sketch.png'}",
                             "--steps", "2", "--seeds", "0", "1", "--compare", "--prompt", "a red circle",
                             "--threads", "1", "--out", str(out)]) == 0
    with Image.open(out) as im:
        w, h = im.size
    # 1 column; rows: 2 maps + 2 seeds x (base + 3 modules alone + composed) = 12 rows of 64x64 (16x16 blown up x4),
    # each labelled in a column on the left (what was sampled, weights, scale, seeds)
    assert h == 12 * (64 + 2) + 2 and w > 64 + 4 + 100, (w, h)
    derived = tmp_path / "derived.png"
    assert run_tool_command(["sample", "--mcm", str(b), "--derive", f"sketch={root / 'photo.png'}", "--steps", "2",
                             "--threads", "1", "--out", str(derived)]) == 0
    assert derived.stat().st_size > 0
    with pytest.raises(ValueError, match="depth"):
        run_tool_command(["sample", "--mcm", str(a), "--cond", f"depth={root / 'seg.png'}", "--out", str(out)])
    with pytest.raises(ValueError, match="module index 5"):
        run_tool_command(["sample", "--mcm", str(a), "--cond", f"5:segmentation={root / 'seg.png'}",
                          "--out", str(out)])


def test_cli_sample_from_held_out_shards(exported, tmp_path):
    from datamodules.shapes import write_shapes_shards

    _, a, b, _ = exported
    write_shapes_shards(tmp_path / "data", train=0, val=8, size=16, shard_size=8, workers=1)
    out = tmp_path / "grid.png"
    assert run_tool_command(["sample", "--mcm", str(a), str(b), "--data", str(tmp_path / "data" / "val-*.tar"),
                             "--n", "3", "--steps", "2", "--seeds", "0", "--threads", "1", "--out", str(out)]) == 0
    with Image.open(out) as im:
        w, h = im.size
    # rows: seg, sketch, real images, composed samples; 3 columns, and the row labels on the left
    assert h == 4 * (64 + 2) + 2 and w > 3 * (64 + 2) + 2 + 50, (w, h)
