"""Cached base predictions (issue #17 item 2): the members ``mcm data encode --predictions K`` writes, and the
training step that reads them instead of running the frozen base.

Bases: the shipped ``shapes32`` (pixel, text, v-prediction), tiny SD (latent, CLIP, epsilon) and a tiny
unconditional pixel base (no guidance branch)."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import modalities
from mcm.training.prediction_cache import (decode_npy, draw_noise, prediction_batch, prediction_draws,
                                          prediction_members)
from mcm.diffusion.forward_process import forward_process_for
from mcm.models.frozen_base import FrozenBase
from mcm.training.mcm_module import MCMModule

SEG = {"segmentation": {"num_classes": 6}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8)
FP16_REL = 2.0 ** -10  # fp16 rounding (2^-11 relative) with a factor 2 of slack


def close16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to fp16 storage precision: |a - b| <= 2^-10 (|b| + 1e-3)."""
    return bool(((a - b).abs() <= FP16_REL * (b.abs() + 1e-3)).all())


@pytest.fixture(scope="module")
def shapes32():
    return FrozenBase.from_pretrained("shapes32")


def captions(B: int) -> list[str]:
    return [["a red circle", "a blue square and a green ring", ""][i % 3] for i in range(B)]


def members_and_batch(base, B: int, k: int, seed: int = 0, caption_list=None):
    g = torch.Generator().manual_seed(seed)
    h, w = base.sample_size
    x0 = torch.randn(B, base.latent_channels, h, w, generator=g)
    keys = [f"sample{seed}_{i:03d}" for i in range(B)]
    caps = caption_list if caption_list is not None else captions(B)
    context = base.encode_context(caps, batch_size=B) if base.is_text_conditional else None
    members = prediction_members(base, x0, context, keys, k)
    return x0, keys, context, members, prediction_batch(members)


@pytest.mark.parametrize("which", ["shapes32", "tiny_sd"])
def test_members_round_trip(which, shapes32, tiny_sd_dir):
    base = shapes32 if which == "shapes32" else FrozenBase.from_pretrained(tiny_sd_dir)
    B, K = 3, 4
    x0, keys, context, members, batch = members_and_batch(base, B, K)
    assert sorted(members[0]) == sorted(f"{n}.npy" for n in ("pred_t", "noise_seed", "xt", "target", "pred",
                                                             "pred_uncond"))
    arr = decode_npy(members[0]["pred.npy"], "pred.npy")
    assert arr.dtype == np.float16 and arr.shape == (K, base.latent_channels, *base.sample_size)
    assert decode_npy(members[0]["pred_t.npy"], "pred_t.npy").dtype == np.int64
    fp = forward_process_for(base.scheduler)
    abar = fp.scheduler.alphas_cumprod
    for i, key in enumerate(keys):
        t, seeds = prediction_draws(key, K, fp)  # a function of the key alone
        assert torch.equal(batch["pred_t"][i], t) and torch.equal(batch["noise_seed"][i], seeds)
        for j in range(K):
            noise = draw_noise(int(batch["noise_seed"][i, j]), x0.shape[1:])
            a = abar[int(t[j])]
            xt = a.sqrt() * x0[i] + (1 - a).sqrt() * noise  # Ho et al. eq. 4, by hand
            assert close16(batch["xt"][i, j], xt)
            # v = sqrt(abar) eps - sqrt(1 - abar) x0 (v-prediction) or eps (epsilon)
            target = a.sqrt() * noise - (1 - a).sqrt() * x0[i] if base.prediction_type == "v_prediction" else noise
            assert close16(batch["target"][i, j], target)
    # pred is the base's prediction for the decoded xt / pred_t, both guidance branches
    xt, t = batch["xt"].flatten(0, 1), batch["pred_t"].flatten(0, 1)
    rep = (lambda c: c.repeat_interleave(K, 0))
    p = base.predict(xt, t, rep(context)).unflatten(0, (B, K))
    pu = base.predict(xt, t, rep(base.uncond_context(B))).unflatten(0, (B, K))
    assert close16(batch["pred"], p) and close16(batch["pred_uncond"], pu)
    assert not torch.allclose(batch["pred"][0], batch["pred_uncond"][0], atol=1e-3)  # a captioned row differs
    # deterministic: the same key gives the same bytes in another batch and position
    again = prediction_members(base, x0[[2, 0]], context[[2, 0]], [keys[2], keys[0]], K)
    for i, j in ((1, 0), (0, 2)):
        assert all(again[i][f"{n}.npy"] == members[j][f"{n}.npy"] for n in ("pred_t", "noise_seed", "xt", "target"))
        assert close16(prediction_batch([again[i]])["pred"], batch["pred"][j:j + 1])  # BLAS may differ by batch


def test_float32_storage_and_no_guidance(tiny_uncond_dir):
    base = FrozenBase.from_pretrained(tiny_uncond_dir)
    h, w = base.sample_size
    x0 = torch.randn(2, base.latent_channels, h, w, generator=torch.Generator().manual_seed(3))
    members = prediction_members(base, x0, None, ["a", "b"], 2, dtype="float32")
    assert "pred_uncond.npy" not in members[0]  # no guidance: one branch
    batch = prediction_batch(members)
    assert decode_npy(members[0]["xt.npy"], "xt").dtype == np.float32
    assert torch.allclose(batch["pred"].flatten(0, 1),
                          base.predict(batch["xt"].flatten(0, 1), batch["pred_t"].flatten(0, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        prediction_members(base, x0, None, ["a", "b"], 2, dtype="bfloat16")
    with pytest.raises(ValueError, match="keys: expected one key per latent"):
        prediction_members(base, x0, None, ["a"], 2)


# ---- training from cached predictions ------------------------------------------------------------------
def make_module(base, **kw) -> MCMModule:
    torch.manual_seed(0)
    with mock.patch.object(FrozenBase, "from_pretrained", lambda *a, **k: base):
        module = MCMModule(base="shapes32", modalities=SEG, **SMALL, **kw)
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # not the zero no-op: gamma, beta matter
    return module.train()


def raw_batch(base, B: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    S = base.sample_size[0]
    return {"image": torch.rand(B, 3, S, S, generator=g) * 2 - 1, "caption": captions(B),
            "key": [f"sample{seed}_{i:03d}" for i in range(B)],
            "segmentation": modalities.get("segmentation", num_classes=6).example(B, S, S, g)}


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_cached_step_equals_online_step(weighting, shapes32):
    """K=1: the loss from the cache equals the online step's for the same x_t / t / noise (fp16 tolerance)."""
    module = make_module(shapes32, caption_dropout=0.0, modality_dropout=0.0, drop_all_prob=0.0,
                         loss_weighting=weighting)
    B = 4
    batch = raw_batch(shapes32, B)
    x0 = batch["image"]  # pixel base: model space is the image
    members = prediction_members(shapes32, x0, shapes32.encode_context(batch["caption"], batch_size=B),
                                 batch["key"], 1)
    cached = {**batch, **prediction_batch(members)}
    t = cached["pred_t"][:, 0]
    noise = torch.stack([draw_noise(int(s), x0.shape[1:]) for s in cached["noise_seed"][:, 0]])
    with torch.no_grad(), mock.patch("torch.randn_like", lambda x: noise), \
            mock.patch.object(module.forward_process, "sample_timesteps", lambda *a, **k: t):
        online = float(module._common_step(batch, "train"))
        from_cache = float(module._common_step(cached, "train"))
    assert abs(from_cache - online) <= 2e-3 * online, (from_cache, online)
    assert online > 0


def test_cached_step_never_runs_the_base_and_picks_draws(shapes32):
    """No base forward, VAE or text encoder; one of the K draws per row (x_t, t, target, p of the same draw);
    pred_uncond exactly for the caption-dropped rows; modality dropout still applied; seeded = reproducible."""
    module = make_module(shapes32, caption_dropout=0.5, modality_dropout=0.5, drop_all_prob=0.0)
    B, K = 48, 4
    g = torch.Generator().manual_seed(1)
    C, (h, w) = shapes32.latent_channels, shapes32.sample_size
    cached = {**raw_batch(shapes32, B), "pred_t": torch.randint(0, 1000, (B, K), generator=g),
              **{n: torch.randn(B, K, C, h, w, generator=g) for n in ("xt", "target", "pred", "pred_uncond")}}
    seen = []

    def spy(base, x_t, t, context, state, strength, base_prediction):
        seen.append((x_t, t, base_prediction(), state))
        return real(base, x_t, t, context, state, strength, base_prediction)

    real = module.mcm.controlled_prediction
    boom = mock.Mock(side_effect=AssertionError("the frozen base ran in the cached path"))
    with mock.patch.object(shapes32, "predict", boom), mock.patch.object(shapes32, "encode_images", boom), \
            mock.patch.object(shapes32, "encode_context", boom), mock.patch.object(shapes32, "encode_text", boom), \
            mock.patch.object(shapes32.unet, "forward", boom), mock.patch.object(module.mcm, "controlled_prediction", spy):
        torch.manual_seed(7)
        loss = module._common_step(cached, "train")
        torch.manual_seed(7)
        loss2 = module._common_step(cached, "train")
    assert boom.call_count == 0
    assert float(loss) == float(loss2) and torch.equal(seen[0][0], seen[1][0])  # seeded runs repeat
    x_t, t, p, state = seen[0]
    picked, dropped = [], []
    for i in range(B):
        j = [k for k in range(K) if torch.equal(x_t[i], cached["xt"][i, k])]
        assert len(j) == 1, f"row {i}: x_t is none of its K cached draws"
        j = j[0]
        picked.append(j)
        assert int(t[i]) == int(cached["pred_t"][i, j])
        is_uncond = torch.equal(p[i], cached["pred_uncond"][i, j])
        assert is_uncond or torch.equal(p[i], cached["pred"][i, j]), f"row {i}: p is neither branch of draw {j}"
        dropped.append(is_uncond)
    assert set(picked) == set(range(K)), picked  # uniform over K: with 48 rows every draw appears
    assert 0 < sum(dropped) < B, dropped  # caption dropout 0.5 sends some rows to pred_uncond, not all
    # the loss is the MSE against the picked draws' targets (no weighting): recompute it by hand
    target = torch.stack([cached["target"][i, j] for i, j in enumerate(picked)])
    with torch.no_grad():
        gamma, beta = module.mcm.modulation(x_t, p, t, state)
    assert torch.allclose(loss.detach(), (p + p * gamma + beta - target).pow(2).mean(), rtol=1e-5)
    presence = state[:, -1, 0, 0]  # the segmentation presence channel: modality dropout 0.5
    assert 0 < float(presence.sum()) < B and set(presence.tolist()) <= {0.0, 1.0}


def test_caption_dropout_one_and_zero_pick_the_branch(shapes32):
    B, K = 6, 2
    g = torch.Generator().manual_seed(2)
    C, (h, w) = shapes32.latent_channels, shapes32.sample_size
    cached = {**raw_batch(shapes32, B), "pred_t": torch.randint(0, 1000, (B, K), generator=g),
              "xt": torch.randn(B, K, C, h, w, generator=g), "target": torch.randn(B, K, C, h, w, generator=g),
              "pred": torch.full((B, K, C, h, w), 1.0), "pred_uncond": torch.full((B, K, C, h, w), -2.0)}
    for dropout, value in ((1.0, -2.0), (0.0, 1.0)):
        module = make_module(shapes32, caption_dropout=dropout)
        with mock.patch.object(module.mcm, "modulation", wraps=module.mcm.modulation) as spy:
            module._common_step(cached, "train")
        p = spy.call_args.args[1]  # modulation(x_t, p, t, features): the p the MCM was given
        assert torch.equal(p, torch.full((B, C, h, w), value))
    # validation: draw 0, conditional branch, whatever the dropout
    module = make_module(shapes32, caption_dropout=1.0)
    cached["pred"][:, 1] = 5.0
    with mock.patch.object(module.mcm, "modulation", lambda x, p, t, f: (torch.zeros_like(p), torch.zeros_like(p))):
        loss = module._common_step(cached, "val")
    assert torch.allclose(loss, (1.0 - cached["target"][:, 0]).pow(2).mean())


def test_bad_cached_batches_are_named(shapes32):
    module = make_module(shapes32)
    B, K = 2, 3
    C, (h, w) = shapes32.latent_channels, shapes32.sample_size
    good = {**raw_batch(shapes32, B), "pred_t": torch.zeros(B, K, dtype=torch.long),
            **{n: torch.zeros(B, K, C, h, w) for n in ("xt", "target", "pred", "pred_uncond")}}
    with pytest.raises(ValueError, match=r"batch\['pred'\]: expected \(2, K, 3, 32, 32\).*another base"):
        module._common_step({**good, "pred": torch.zeros(B, K, 4, h, w)}, "train")
    with pytest.raises(ValueError, match=r"batch\['pred_uncond'\]: expected \(2, 3, 3, 32, 32\)"):
        module._common_step({k: v for k, v in good.items() if k != "pred_uncond"}, "train")
    with pytest.raises(ValueError, match=r"batch\['pred_t'\]: expected \(2, 3\)"):
        module._common_step({**good, "pred_t": torch.zeros(B, dtype=torch.long)}, "train")
    # the cache's timesteps were drawn from the density base.json names: another one is refused at fit start
    biased = make_module(shapes32, timestep_sampling="cubic")
    record = {"hash": shapes32.content_hash(), "predictions": 4, "timestep_density": "ddpm/uniform",
              "shard_dir": "enc/"}
    with pytest.raises(ValueError, match=r"drawn with timestep density 'ddpm/uniform' but this run's forward "
                                         r"process draws from 'ddpm/cubic'"):
        biased.check_cached_base(mock.Mock(cached_base=record))
    make_module(shapes32).check_cached_base(mock.Mock(cached_base=record))  # the same density: accepted
    older = {k: v for k, v in record.items() if k != "timestep_density"}  # written before the density was recorded
    make_module(shapes32).check_cached_base(mock.Mock(cached_base=older))  # variance-preserving draws were uniform


@pytest.mark.parametrize("kind", ["controlnet", "t2i_adapter"])
def test_residual_adapters_refuse_cached_predictions(kind, tiny_pixel_base_dir):
    from mcm.training.controlnet_module import ControlNetModule
    from mcm.training.t2i_adapter_module import T2IAdapterModule

    klass = ControlNetModule if kind == "controlnet" else T2IAdapterModule
    module = klass(base=str(tiny_pixel_base_dir), modalities=SEG)
    base = module.base
    B, K = 2, 1
    C, (h, w) = base.latent_channels, base.sample_size
    cached = {**raw_batch(base, B), "pred_t": torch.zeros(B, K, dtype=torch.long),
              **{n: torch.zeros(B, K, C, h, w) for n in ("xt", "target", "pred", "pred_uncond")}}
    with pytest.raises(ValueError, match=r"cannot train from them: it injects residuals into the base's forward"):
        module._common_step(cached, "train")
    assert not type(module.trainable).uses_base_prediction_only
