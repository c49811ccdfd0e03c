"""Training from cached base predictions on every family (issue: correctness): for the same draw, the step
that reads ``mcm data encode --predictions`` members sees the same ``p`` / ``p_uncond`` and the same loss as the
online step that runs the base.

Regressions guarded: SDXL's caption-dropped rows got the base's native-size ``time_ids`` online (so online
training disagreed with the cache and with sampling); SD3 steps on cached shards were all refused (the check
expected uniform draws, flow matching draws logit-normally) and flow timesteps were truncated to integers.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch.utils.data import default_collate

import modalities
from datamodules.cached_fields import decode_cached
from mcm.training.encode import EncodeSettings, base_record, encode_batch
from mcm.training.prediction_cache import draw_noise
from mcm.models.frozen_base import FrozenBase
from mcm.training.mcm_module import MCMModule

SEG = {"segmentation": {"num_classes": 6}}
SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(), norm_num_groups=4)
#: family, its tiny directory's fixture, a training image size (SDXL's is not its native 16: size time_ids matter)
FAMILIES = [("sd", "tiny_sd_dir", 64), ("sdxl", "tiny_sdxl_dir", 32), ("dit", "tiny_dit_dir", 16),
            ("sd3", "tiny_sd3_dir", 16), ("pixart_sigma", "tiny_pixart_sigma_dir", 16),
            ("flux", "tiny_flux_dir", 32), ("flux2", "tiny_flux2_dir", 32), ("qwenimage", "tiny_qwenimage_dir", 32),
            ("sana", "tiny_sana_dir", 16), ("zimage", "tiny_zimage_dir", 32)]
CAPTIONS = ["a red circle", "a blue square and a green ring", "a ring"]


def batches(base, base_dir, S: int, B: int = 3):
    """The same samples as an online batch (cached latents / text, the base runs) and as a cached-prediction
    batch (K = 1), both made by ``encode_batch`` (what ``mcm data encode`` writes) and read back by the
    DataModule's decoder."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, S, S, generator=g) * 2 - 1 for _ in range(B)]
    labels = [1, 7, 3][:B]
    keys = [f"k{i}" for i in range(B)]
    settings = EncodeSettings(base=str(base_dir), image_size=S, batch_size=B, flip=False, predictions=1)
    members = encode_batch(base, settings, images, CAPTIONS[:B], labels, keys)
    decoded = default_collate([decode_cached(m) for m in members])
    common = {"image": torch.stack(images), "caption": CAPTIONS[:B], "key": keys,
              "segmentation": modalities.get("segmentation", num_classes=6).example(B, S, S, g)}
    if base.is_class_conditional:
        common["class_label"] = torch.tensor(labels)
    online = {**common, **{k: v for k, v in decoded.items() if k in ("latent", "text_emb")}}
    return online, {**online, **decoded}, settings


def make_module(base, **kw) -> MCMModule:
    torch.manual_seed(0)
    with mock.patch.object(FrozenBase, "from_pretrained", lambda *a, **k: base):
        module = MCMModule(base="tiny", modalities=SEG, **SMALL, modality_dropout=0.0, drop_all_prob=0.0, **kw)
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # gamma, beta != 0
    return module.train()


def step(module, batch: dict, draw: dict | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One training step's loss, the ``p`` the MCM was given and the ``t``; ``draw`` forces the online step's
    noise and timesteps to a cached draw, and rounds ``x_t`` to fp16 as the cache stores it before the base sees
    it (so both steps ask the base about the same input)."""
    fp = module.forward_process
    patches = [mock.patch.object(module.mcm, "modulation", wraps=module.mcm.modulation)]
    if draw is not None:
        real_add = fp.add_noise
        patches += [mock.patch("torch.randn_like", lambda x: draw["noise"].to(x)),
                    mock.patch.object(fp, "sample_timesteps", lambda *a, **k: draw["t"]),
                    mock.patch.object(fp, "add_noise", lambda x0, n, t: real_add(x0, n, t).half().float())]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        spy = stack.enter_context(patches[0])
        for p in patches[1:]:
            stack.enter_context(p)
        loss = float(module._common_step(batch, "train"))
    x_t, p, t = spy.call_args.args[:3]
    return loss, p, t


@pytest.mark.parametrize("family,fixture,S", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("caption_dropout", [0.0, 1.0], ids=["cond", "dropped"])
def test_cached_step_equals_online_step_on_every_family(family, fixture, S, caption_dropout, request):
    base_dir = request.getfixturevalue(fixture)
    base = FrozenBase.from_pretrained(base_dir)
    assert base.family == family
    online, cached, settings = batches(base, base_dir, S)
    module = make_module(base, caption_dropout=caption_dropout)
    module.check_cached_base(mock.Mock(cached_base={**base_record(base, settings), "shard_dir": "enc"}))
    t = cached["pred_t"][:, 0]
    assert t.is_floating_point() == (family in ("sd3", "flux", "flux2", "qwenimage", "sana", "zimage"))  # flow t = 1000 sigma: a float, never truncated
    noise = torch.stack([draw_noise(int(s), cached["latent"].shape[1:]) for s in cached["noise_seed"][:, 0]])
    loss_online, p_online, t_online = step(module, online, {"noise": noise, "t": t})
    loss_cached, p_cached, t_cached = step(module, cached)
    assert torch.equal(t_online, t_cached)
    # p (caption kept) or p_uncond (caption dropped) of the same draw: equal to the cache's fp16 precision
    scale = float(p_online.abs().max())
    assert float((p_cached - p_online).abs().max()) <= 2e-3 * scale, (family, caption_dropout)
    assert abs(loss_cached - loss_online) <= 2e-3 * loss_online, (loss_cached, loss_online)


def test_sdxl_dropped_rows_get_the_training_size_time_ids(tiny_sdxl_dir):
    """The unconditional branch of caption dropout is built for the images' size, as the conditional one."""
    base = FrozenBase.from_pretrained(tiny_sdxl_dir)
    module = make_module(base, caption_dropout=1.0)
    batch = {"image": torch.zeros(2, 3, 24, 40), "caption": ["a ring", "a cross"]}
    ctx = module._context(batch, 2, train=True)
    assert ctx["time_ids"].tolist() == [[24, 40, 0, 0, 24, 40]] * 2
    assert torch.equal(ctx["time_ids"], base.uncond_context(2, image_size=(24, 40))["time_ids"])
    assert float(ctx["prompt_embeds"].abs().max()) == 0  # force_zeros_for_empty_prompt: the zero branch


def test_flow_shards_from_an_older_encoder_are_refused(tiny_sd3_dir):
    base = FrozenBase.from_pretrained(tiny_sd3_dir)
    module = make_module(base)
    old = {"hash": base.content_hash(), "predictions": 2, "shard_dir": "old"}  # no timestep_density recorded
    with pytest.raises(ValueError, match="truncated to integers.*re-encode"):
        module.check_cached_base(mock.Mock(cached_base=old))
