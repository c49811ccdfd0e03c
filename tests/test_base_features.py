"""``base_features`` (issue 30, the sketch-gap study): the MCM also reads the frozen base's own down- and
middle-block features of ``x_t``, captured in the base's forward; zero-initialised it is still an exact no-op, the
features are those of the very forward that gives ``p``, a trained module's output depends on them, it exports and
reloads with them, and it refuses what it cannot do (cached predictions, ``mcm.attach``, a transformer base)."""
from __future__ import annotations

import pytest
import torch

from mcm.models.frozen_base import FrozenBase, FrozenBaseError
from mcm.pipelines import MCMPipeline, load_module
from mcm.training.export import export_checkpoint
from mcm.training.mcm_module import MCMModule
from test_mcm import make_batch
from tiny_models import train_and_export

SEG = {"segmentation": {"num_classes": 6}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)


@pytest.fixture
def module(tiny_pixel_base_dir):
    torch.manual_seed(0)
    return MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL, base_features=True)


def test_features_are_the_forward_of_p_and_the_zero_module_is_a_noop(module):
    base, mcm = module.base, module.mcm
    widths = list(base.unet.config.block_out_channels)
    assert list(mcm.config.base_feature_channels) == base.feature_channels() == widths + [widths[-1]]
    assert not mcm.uses_base_prediction_only
    batch = make_batch(2)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([100, 700]), base.encode_text(batch["caption"])
    p, feats = base.predict_with_features(x, t, ctx)
    assert torch.equal(p, base.predict(x, t, ctx))  # the hooks change nothing
    assert [f.shape[1] for f in feats] == base.feature_channels() and feats[-1].shape[-1] < 16  # downsampled levels
    state = mcm.encode_conditions({"segmentation": batch["segmentation"]}, None, (16, 16), 2)
    out = mcm.controlled_prediction(base, x, t, ctx, state, 1.0, lambda: pytest.fail("p comes with the features"))
    assert torch.equal(out, p)  # zero-initialised output layer: exactly p
    torch.nn.init.normal_(mcm.unet.conv_out.weight, std=0.05)
    a = mcm.modulation(x, p, t, state, base_features=feats)[0]
    b = mcm.modulation(x, p, t, state, base_features=[torch.zeros_like(f) for f in feats])[0]
    assert float((a - b).abs().max()) > 1e-4  # the output reads them
    with pytest.raises(ValueError, match=f"reads {len(feats)} base feature maps"):
        mcm.modulation(x, p, t, state)


def test_it_trains_exports_and_refuses_cached_predictions_and_attach(module, tmp_path):
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # zero-initialised: no gradient upstream
    _, loaded = train_and_export(module, make_batch(2), tmp_path, steps=1)  # the last step's gradients stay
    assert all(p.grad is None for p in module.base.frozen_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.mcm.base_feature_proj.parameters())
    assert list(loaded.config.base_feature_channels) == list(module.mcm.config.base_feature_channels)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.mcm.state_dict().items())
    batch = make_batch(2)
    batch.update(pred=torch.zeros(2, 1, 3, 16, 16), pred_t=torch.zeros(2, 1, dtype=torch.long),
                 xt=torch.zeros(2, 1, 3, 16, 16), target=torch.zeros(2, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="cannot train from them"):
        module.training_step(batch, 1)
    pipe = MCMPipeline.from_base(module.base, [loaded])
    pipe.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 6, (1, 16, 16))
    assert pipe(conditions={"segmentation": labels}, num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)


def test_a_transformer_base_says_it_has_no_unet_blocks(tiny_dit_dir):
    with pytest.raises(FrozenBaseError, match="no UNet down and middle blocks"):
        FrozenBase.from_pretrained(tiny_dit_dir).feature_channels()


def test_features_at_the_mcms_own_levels(tiny_pixel_base_dir, tmp_path):
    """``base_feature_levels``: zero-initialised level projections leave the module's output as without them;
    once non-zero they change it; a step trains them; the export reloads with them (the hooks come back)."""
    torch.manual_seed(0)
    m = MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL, base_features=True,
                  base_feature_levels=True, warmup_steps=0, lr=1e-2)
    mcm, base = m.mcm, m.base
    assert len(mcm.base_feature_level_proj) == len(SMALL["block_out_channels"]) + 1  # 2 down blocks + middle
    torch.nn.init.normal_(mcm.unet.conv_out.weight, std=0.05)
    torch.manual_seed(0)
    plain = MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL, base_features=True).mcm
    plain.load_state_dict({k: v for k, v in mcm.state_dict().items() if "level_proj" not in k})
    batch = make_batch(2)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([100, 700]), base.encode_text(batch["caption"])
    p, feats = base.predict_with_features(x, t, ctx)
    state = mcm.encode_conditions({"segmentation": batch["segmentation"]}, None, (16, 16), 2)
    zero = mcm.modulation(x, p, t, state, base_features=feats)[0]
    assert torch.equal(zero, plain.modulation(x, p, t, state, base_features=feats)[0])
    opt = m.configure_optimizers()["optimizer"]
    m.train()
    m.training_step(batch, 0).backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in mcm.base_feature_level_proj.parameters())
    opt.step()
    m.eval()
    moved = mcm.modulation(x, p, t, state, base_features=feats)[0]
    assert float((moved - zero).abs().max()) > 1e-6
    ckpt = {"state_dict": m.state_dict(), "global_step": 1}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded, _ = load_module(export_checkpoint(tmp_path / "m.ckpt", tmp_path / "export", use_ema=False), base)
    assert loaded.config.base_feature_levels
    assert torch.equal(loaded.modulation(x, p, t, state, base_features=feats)[0], moved)
    with pytest.raises(ValueError, match="base_feature_levels: needs base_feature_channels"):
        MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL, base_feature_levels=True)
