"""Speed-ups keep results the same (issue 7): each optimisation against the plain code path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modalities
from mcm.training.mcm_module import MCMModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # steps run without a Trainer

SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8)
SEG = {"segmentation": {"num_classes": 6}}


def _batch(B: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(B, 3, size, size, generator=g) * 2 - 1,
            "caption": ["a red circle", "a blue square", "", "a red circle and a blue square"][:B],
            "segmentation": modalities.get("segmentation", num_classes=6).example(B, size, size, g)}


@pytest.mark.parametrize("base_fixture, size", [("tiny_sd_dir", 64), ("tiny_pixel_base_dir", 16)])
def test_cached_latents_and_text_give_the_same_loss(base_fixture, size, request):
    """``batch["latent"]`` / ``batch["text_emb"]`` (cached VAE latents and caption embeddings, used by
    the benchmarks to keep encoder work out of the step) give the loss of the plain step, with
    caption dropout applied to the cached embeddings exactly as to the captions."""
    torch.manual_seed(0)
    module = MCMModule(base=str(request.getfixturevalue(base_fixture)), modalities=SEG, **SMALL,
                       caption_dropout=0.5)
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # not a no-op: the MCM matters
    batch = _batch(4, size)
    torch.manual_seed(1)
    plain = module._common_step(batch, "train")
    torch.manual_seed(1)
    latent = module.base.encode_images(batch["image"])  # consumes the RNG as the plain step's encode does
    cached = dict(batch, latent=latent, text_emb=module.base.encode_text(batch["caption"]))
    fast = module._common_step(cached, "train")
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.manual_seed(2)  # and with dropout hitting some rows but not others (checked, not assumed)
    drop = torch.rand(4) < 0.5
    assert drop.any() and not drop.all()
    torch.manual_seed(2)
    a = module._common_step(dict(cached, latent=latent), "train")
    torch.manual_seed(2)
    plain_latent = dict(batch, latent=latent)
    b = module._common_step(plain_latent, "train")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shapes_shards_are_plain_ustar_and_reproducible(tmp_path):
    """Shards carry no per-member pax header (webdataset's float mtime made one: 1.8x the bytes,
    2.8x the tar parsing time) and are byte-identical when written twice; decoding is unchanged."""
    import tarfile

    from datamodules.shapes import make_sample, write_shapes_shards

    a = write_shapes_shards(tmp_path / "a", train=6, val=0, size=16, seed=3, workers=1)["train"][0]
    b = write_shapes_shards(tmp_path / "b", train=6, val=0, size=16, seed=3, workers=1)["train"][0]
    assert Path(a).read_bytes() == Path(b).read_bytes()
    with tarfile.open(a) as tf:
        members = tf.getmembers()
        assert members and all(not m.pax_headers for m in members)
        png = tf.extractfile(f"train_{2:08d}.png").read()
    from datamodules.shapes import _png

    assert png == _png(make_sample(3, 2, 16, "train").image)


def test_fused_adamw_matches_the_default_update():
    """``mcm_module.adamw`` (fused where available) updates the MCM as the default AdamW does."""
    from mcm.training.adapter_module import adamw
    from mcm.models.modulator import MultimodalConditioningModule

    torch.manual_seed(0)
    a = MultimodalConditioningModule(latent_channels=4, modalities=SEG, downsample=1, **SMALL)
    b = MultimodalConditioningModule(latent_channels=4, modalities=SEG, downsample=1, **SMALL)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = adamw(a.parameters(), 1e-3, 0.01), torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for pa, pb in zip(a.parameters(), b.parameters()):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt_a.defaults["fused"], "fused AdamW exists for CPU in this torch; it should be used"


def _loss_and_grads(base_dir: Path, **speed) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's loss and the MCM's flattened gradient, same init and RNG for every variant."""
    torch.manual_seed(0)
    module = MCMModule(base=str(base_dir), modalities=SEG, **SMALL, caption_dropout=0.0, **speed)
    w = module.mcm.unet.conv_out.weight  # not a no-op: the MCM matters. copy_ (not normal_, which fills
    with torch.no_grad():                # memory order) gives channels_last weights the same logical values
        w.copy_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(1)
    loss = module._common_step(_batch(4, 16), "train")
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.mcm.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("speed, rtol", [({"channels_last": True}, 1e-4), ({"base_dtype": "bfloat16"}, 3e-2),
                                         ({"compile": "aot_eager"}, 1e-4)], ids=["channels_last", "bf16_base", "compile"])
def test_speed_options_keep_loss_and_gradients(tiny_pixel_base_dir, speed, rtol):
    """Each optimisation of the training step against the plain fp32 step: the same loss and MCM
    gradient within its tolerance (exact up to float reordering; bf16 base within bf16's precision).
    torch.compile runs with the ``aot_eager`` backend here: the same graph capture and autograd as
    inductor, without minutes of C++ code generation on a 2-core CPU."""
    ref_loss, ref_grad = _loss_and_grads(tiny_pixel_base_dir)
    loss, grad = _loss_and_grads(tiny_pixel_base_dir, **speed)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)
    assert cos > 1 - rtol, f"{speed}: gradient direction changed (cosine {cos:.5f})"
    torch.testing.assert_close(grad.norm(), ref_grad.norm(), rtol=rtol, atol=1e-8)
