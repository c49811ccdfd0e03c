"""``condition_features`` (issue 30, the sketch-gap study): a pretrained condition encoder. The frozen base reads
each map drawn as an image (at ``t = 0``, no grad) and the MCM reads the base's features of it; zero-initialised
the module is still an exact no-op, absent maps contribute nothing, the projections train (the base does not), the
export reloads with them and samples under classifier-free guidance, and a latent base is refused clearly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcm.pipelines import MCMPipeline
from mcm.training.mcm_module import MCMModule
from test_mcm import make_batch
from tiny_models import train_and_export

MAPS = {"segmentation": {"num_classes": 6}, "sketch": {}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)


@pytest.fixture
def module(tiny_pixel_base_dir):
    torch.manual_seed(0)
    return MCMModule(base=str(tiny_pixel_base_dir), modalities=MAPS, **SMALL, condition_features=True,
                     warmup_steps=0, lr=1e-2)


def test_the_base_reads_each_drawn_map_and_the_zero_module_is_a_noop(module):
    base, mcm = module.base, module.mcm
    assert list(mcm.config.condition_feature_channels) == base.feature_channels()
    assert not mcm.uses_base_prediction_only and mcm.drawn_map_channels == 6
    batch = make_batch(2)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([100, 700]), base.encode_text(batch["caption"])
    seg = batch["segmentation"]
    state = mcm.encode_conditions({"segmentation": seg}, None, (16, 16), 2)  # the sketch is absent
    drawn = mcm.plugins["segmentation"].visualize(seg) * 2 - 1
    assert torch.equal(state[:, -6:-3], drawn) and not state[:, -3:].any()
    # the features are the base's own of the drawn map at t = 0, projected and resized
    _, feats = base.predict_with_features(drawn, torch.zeros(2, dtype=torch.long))
    want = [F.interpolate(proj(f), size=(16, 16), mode="bilinear", align_corners=False)
            for proj, f in zip(mcm.condition_feature_proj["segmentation"], feats)]
    got = mcm.condition_features(base, state)
    assert len(got) == 2 * len(feats)  # segmentation's levels, then the sketch's
    for g, w in zip(got[:len(feats)], want):
        torch.testing.assert_close(g, w)
    assert all(not g.any() for g in got[len(feats):])  # an absent map adds nothing
    p = base.predict(x, t, ctx)
    out = mcm.controlled_prediction(base, x, t, ctx, state, 1.0, lambda: p)
    assert torch.equal(out, p)  # zero-initialised output layer: exactly p
    torch.nn.init.normal_(mcm.unet.conv_out.weight, std=0.05)
    a = mcm.modulation(x, p, t, state, condition_features=got)[0]
    b = mcm.modulation(x, p, t, state, condition_features=[torch.zeros_like(g) for g in got])[0]
    assert float((a - b).detach().abs().max()) > 1e-4  # the output reads them
    with pytest.raises(ValueError, match="pass condition_features"):
        mcm.modulation(x, p, t, state)
    with pytest.raises(ValueError, match="pass the FrozenBase it was trained with, got NoneType"):
        mcm(x, p, t, {"segmentation": seg})  # forward without the base


def test_it_trains_exports_and_samples_with_guidance(module, tmp_path):
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # zero-initialised: no gradient upstream
    _, loaded = train_and_export(module, make_batch(2), tmp_path, steps=1)  # the last step's gradients stay
    assert all(p.grad is None for p in module.base.frozen_parameters())
    projs = module.mcm.condition_feature_proj.parameters()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projs)
    assert list(loaded.config.condition_feature_channels) == module.base.feature_channels()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.mcm.state_dict().items())
    pipe = MCMPipeline.from_base(module.base, [loaded])
    pipe.set_progress_bar_config(disable=True)
    sketch = make_batch(1)["sketch"]
    run = dict(num_inference_steps=2, guidance_scale=3.0, prompt="a red circle", seeds=[0], output_type="pt")
    with_map = pipe(conditions={"sketch": sketch}, **run).images
    blank = pipe(conditions={"sketch": torch.zeros_like(sketch)}, **run).images
    assert with_map.shape == (1, 3, 16, 16) and float((with_map - blank).abs().max()) > 1e-4


def test_a_latent_base_is_refused_with_the_reason(tiny_sd_dir):
    with pytest.raises(ValueError, match="pixel space .*got downsample 8"):
        MCMModule(base=str(tiny_sd_dir), modalities=MAPS, **SMALL, condition_features=True)
