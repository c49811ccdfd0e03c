"""MCM core: exact no-op at init, gradients only in the MCM, base never changes, checkpoints
refer to the base, export round trip, pipeline inputs and composition identities."""
from __future__ import annotations

import math

import json

import numpy as np
import pytest
import torch
from PIL import Image

import modalities
from mcm.training.export import export_checkpoint, module_from_checkpoint
from mcm.models.frozen_base import FrozenBase
from mcm.models.frozen_base import BaseMismatchError
from mcm.training.mcm_module import MCMModule
from mcm.models.modulator import MultimodalConditioningModule, modulate
from mcm.pipelines import MCMPipeline, load_module, save_module

ALL = {"segmentation": {"num_classes": 6}, "sketch": {}, "depth": {}, "partial_mask": {"num_classes": 6}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8)


def make_batch(B: int = 4, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(B, 3, size, size, generator=g) * 2 - 1, "caption": ["a red circle"] * B,
             "key": [f"k{i}" for i in range(B)]}
    for name, opts in ALL.items():
        batch[name] = modalities.get(name, **opts).example(B, size, size, g)
    return batch


@pytest.fixture
def module(tiny_pixel_base_dir):
    torch.manual_seed(0)
    return MCMModule(base=str(tiny_pixel_base_dir), modalities=ALL, **SMALL, ema_decay=0.9)


def test_zero_init_is_exact_noop(module):
    batch = make_batch()
    base = module.base
    x = torch.randn(4, base.latent_channels, 16, 16)
    t = torch.tensor([0, 10, 500, 999])
    p = base.predict(x, t, base.encode_text(batch["caption"]))
    gamma, beta = module.mcm(x, p, t, {n: batch[n] for n in ALL})
    assert torch.equal(gamma, torch.zeros_like(p)) and torch.equal(beta, torch.zeros_like(p))
    assert torch.equal(modulate(p, gamma, beta), p)
    assert torch.equal(modulate(p, gamma, beta, 0.5), p)


@pytest.mark.parametrize("latent, ds", [(3, 1), (4, 8)])
def test_every_modality_forward_backward(latent, ds):
    """Loop over every installed modality (timm habit): shapes, no NaN, every parameter gets a gradient."""
    for name in modalities.list_modalities():
        plugin = modalities.get(name)
        mcm = MultimodalConditioningModule(latent_channels=latent, modalities={name: {}}, downsample=ds, **SMALL)
        torch.nn.init.normal_(mcm.unet.conv_out.weight, std=0.01)  # leave the zero init so gradients reach inside
        H = 16 * ds
        cond = plugin.example(2, H, H, torch.Generator().manual_seed(1))
        x, p = torch.randn(2, latent, 16, 16), torch.randn(2, latent, 16, 16)
        gamma, beta = mcm(x, p, torch.tensor([3, 700]), {name: cond})
        assert gamma.shape == p.shape and beta.shape == p.shape
        assert torch.isfinite(gamma).all() and torch.isfinite(beta).all()
        (modulate(p, gamma, beta) - p).pow(2).mean().backward()
        missing = [n for n, q in mcm.named_parameters() if q.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:5]}"


def test_training_step_trains_only_the_mcm(module):
    base_hash = module.base.content_hash()
    names = {n for n, _ in module.named_parameters()}
    assert names and all(n.startswith("mcm.") for n in names), "only MCM parameters may be in the module"
    assert not any(k.startswith("base") for k in module.state_dict())
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.mcm.parameters()}
    module.train()
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.01)
    seen = []  # what the base returns inside the step: computed without a graph (no activation kept)
    predict = module.base.predict
    module.base.predict = lambda *a, **k: seen.append(predict(*a, **k)) or seen[-1]
    try:
        loss = module.training_step(make_batch(), 0)
    finally:
        del module.base.predict
    assert seen and all(p.grad_fn is None and not p.requires_grad for p in seen)
    loss.backward()
    grads = {n: p.grad for n, p in module.mcm.named_parameters()}
    assert all(g is not None for g in grads.values()) and sum(float(g.abs().sum()) for g in grads.values()) > 0
    before = {n: p.detach().clone() for n, p in module.mcm.named_parameters()}
    for group in opt.param_groups:  # the warm-up scheduler starts at lr 0
        group["lr"] = 1e-3
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in module.mcm.named_parameters()), "the MCM did not move"
    assert not any(p.requires_grad for p in module.base.frozen_parameters())
    module.base._hash = None
    assert module.base.content_hash() == base_hash, "the base changed during training"
    assert not module.base.training


def test_modality_dropout(module):
    torch.manual_seed(0)
    keep = module.presence(4000, train=True)
    rate = 1 - keep.mean().item()
    expected = 1 - (1 - 0.3) * (1 - 0.1)
    assert abs(rate - expected) < 0.03
    all_dropped = (keep.sum(1) == 0).float().mean().item()
    assert all_dropped > 0.1  # drop-all plus independent drops of all four
    assert torch.equal(module.presence(3, train=False), torch.ones(3, 4))


def test_single_modality_dropout(module):
    """w.p. q exactly one modality (uniformly chosen) is kept, else independent dropout; then drop-all."""
    module.hparams.single_modality_prob = 0.5
    try:
        torch.manual_seed(0)
        keep = module.presence(40000, train=True)
    finally:
        module.hparams.single_modality_prob = 0.0
    n_kept = keep.sum(1)
    M, d, a = 4, 0.3, 0.1
    indep = [(1 - d) ** k * d ** (M - k) * math.comb(M, k) for k in range(M + 1)]  # kept count under dropout
    expected_one = (1 - a) * (0.5 + 0.5 * indep[1])
    assert abs((n_kept == 1).float().mean().item() - expected_one) < 0.01
    assert abs((n_kept == 0).float().mean().item() - (a + (1 - a) * 0.5 * indep[0])) < 0.01
    alone = keep[n_kept == 1]
    share = alone.mean(0)  # each modality is the one kept equally often
    assert torch.allclose(share, torch.full((M,), 0.25), atol=0.015)


def test_map_loss_weight_weighs_pixels_near_present_strokes(module):
    """map_loss_weight = lambda: weights 1 + lambda near a present sketch's strokes (3x3 dilation), 1 elsewhere and
    for samples whose sketch is dropped, normalised to mean 1; the loss is the hand-weighted MSE; 0 = off."""
    from mcm.diffusion.forward_process import ForwardProcess

    B, size = 3, 8
    batch = make_batch(B, size)
    sketch = torch.zeros(B, 1, size, size)
    sketch[0, 0, 2, 3] = 1.0  # one stroke pixel: its 3x3 neighbourhood is weighted
    sketch[1, 0, :, 0] = 1.0  # a column at the border: columns 0 and 1
    sketch[2, 0, 4, 4] = 1.0  # this sample's sketch is dropped below
    batch["sketch"] = sketch
    keep = torch.ones(B, 4)
    keep[2, module.modality_names.index("sketch")] = 0.0
    assert module.map_pixel_weights(batch, keep, (size, size)) is None  # default 0: off
    module.hparams.map_loss_weight = 3.0
    try:
        w = module.map_pixel_weights(batch, keep, (size, size))
        half = module.map_pixel_weights(batch, keep, (size // 2, size // 2))  # model space smaller than the maps
    finally:
        module.hparams.map_loss_weight = 0.0
    raw0 = torch.ones(size, size)
    raw0[1:4, 2:5] = 4.0
    raw1 = torch.ones(size, size)
    raw1[:, :2] = 4.0
    for got, raw in ((w[0, 0], raw0), (w[1, 0], raw1), (w[2, 0], torch.ones(size, size))):
        assert torch.allclose(got, raw / raw.mean())
    assert half.shape == (B, 1, 4, 4) and torch.allclose(half[1, 0, :, 0], torch.full((4,), 4.0 / (1 + 3 * 0.25)))
    fp = ForwardProcess({"num_train_timesteps": 1000, "prediction_type": "epsilon"})
    pred, target = torch.randn(B, 3, size, size), torch.randn(B, 3, size, size)
    t = torch.tensor([10, 500, 900])
    want = ((pred - target) ** 2 * w).mean((1, 2, 3)).mean()
    assert torch.allclose(fp.loss(pred, target, t, w), want)
    assert torch.allclose(fp.loss(pred, target, t, torch.ones(B, 1, size, size)), fp.loss(pred, target, t))


def test_checkpoint_records_base_and_refuses_another(module, tiny_uncond_dir, tiny_pixel_base_dir, tmp_path):
    ckpt = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(ckpt)
    # the recorded hash is the base's content: the same files loaded again give it, one changed weight does not
    assert ckpt["mcm_base"]["hash"] == FrozenBase.from_pretrained(tiny_pixel_base_dir).content_hash()
    nudged = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    with torch.no_grad():
        next(iter(nudged.frozen_parameters())).view(-1)[0] += 1e-3
    assert nudged.content_hash() != ckpt["mcm_base"]["hash"]
    object.__setattr__(module, "base", nudged)
    with pytest.raises(BaseMismatchError, match="force_base"):
        module.on_load_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    other = FrozenBase.from_pretrained(tiny_uncond_dir)
    object.__setattr__(module, "base", other)
    with pytest.raises(BaseMismatchError, match="force_base"):
        module.on_load_checkpoint(ckpt)
    module.hparams.force_base = True
    module.on_load_checkpoint(ckpt)  # forced: allowed


def test_export_round_trip(module, tmp_path):
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.01)
    ckpt = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    out = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "export", use_ema=False)
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "mcm_base.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    loaded, info = load_module(out, module.base)
    assert info["hash"] == module.base.content_hash()
    assert loaded.modality_names == module.mcm.modality_names  # channel layout survives config.json
    theirs = loaded.state_dict()
    for n, a in module.mcm.state_dict().items():
        assert torch.equal(a, theirs[n]), n
    size = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 4 * module.mcm.num_trainable_parameters() + 100_000  # the MCM alone, never the base

def test_ema_export_holds_the_ema_weights(module, tmp_path):
    """Regression for a check by parameter count: the exported tensors are the EMA's shadow weights, which
    differ from the live ones after a few EMA steps."""
    with torch.no_grad():
        for step in range(3):  # live weights move, the EMA follows at decay 0.9
            for p in module.mcm.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            module.ema.step(module.mcm.parameters())
    shadow = [s.clone() for s in module.ema.shadow_params]
    live = [p.detach().clone() for p in module.mcm.parameters()]
    assert sum(not torch.equal(a, b) for a, b in zip(shadow, live)) == len(live), "EMA and live weights coincide"
    ckpt = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded = torch.load(tmp_path / "m.ckpt", weights_only=True)
    ema_module = module_from_checkpoint(loaded, use_ema=True)
    raw_module = module_from_checkpoint(loaded, use_ema=False)
    names = [n for n, _ in module.mcm.named_parameters()]
    for name, p, s, w in zip(names, ema_module.parameters(), shadow, live):
        assert torch.equal(p, s), f"{name}: not the EMA weight"
    for name, p, w in zip(names, raw_module.parameters(), live):
        assert torch.equal(p, w), f"{name}: --no-ema must give the live weight"
    # and through the export on disk (safetensors), as `mcm export` writes it
    out = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "ema_export", use_ema=True)
    on_disk, _ = load_module(out, module.base)
    for name, p, s in zip(names, on_disk.parameters(), shadow):
        assert torch.equal(p, s), f"{name}: the exported file does not hold the EMA weight"


def test_export_records_default_strength_and_keeps_the_trained_weights(module, tmp_path):
    """``mcm export --strength s`` records ``default_strength = s``; weights stay as trained; ``strength=None``
    samples at ``s``, an explicit float overrides it."""
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)
    ckpt = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    plain = MCMPipeline.from_pretrained(export_checkpoint(tmp_path / "m.ckpt", tmp_path / "plain", use_ema=False))
    rec_dir = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "recorded", use_ema=False, strength=2.5)
    assert json.loads((rec_dir / "config.json").read_text())["default_strength"] == 2.5
    recorded = MCMPipeline.from_pretrained(rec_dir)
    assert plain.modules[0].default_strength == 1.0 and recorded.modules[0].default_strength == 2.5
    for name, w in module.mcm.state_dict().items():  # never rescaled
        assert torch.equal(recorded.modules[0].state_dict()[name], w), name
    cond = {"segmentation": make_batch(2)["segmentation"]}
    kw = dict(conditions=cond, num_inference_steps=3, seeds=[0, 1], output_type="pt")
    assert torch.equal(plain(strength=2.5, **kw).images, recorded(**kw).images)
    assert torch.equal(plain(**kw).images, recorded(strength=1.0, **kw).images)
    assert not torch.allclose(recorded(**kw).images, plain(**kw).images, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        export_checkpoint(tmp_path / "m.ckpt", tmp_path / "bad", strength=0.0)


@pytest.fixture
def pipe(module, tmp_path):
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)
    save_module(module.mcm, tmp_path / "mcm", module.base)
    return MCMPipeline.from_pretrained(tmp_path / "mcm")


def test_pipeline_inputs_and_determinism(pipe):
    seg = np.random.default_rng(0).integers(0, 6, (16, 16))
    a = pipe(conditions={"segmentation": seg}, num_inference_steps=3, seeds=[5], output_type="pt").images
    assert a.shape == (1, 3, 16, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    b = pipe(conditions={"segmentation": torch.from_numpy(seg)}, num_inference_steps=3, seeds=[5], output_type="pt").images
    c = pipe(conditions={"segmentation": Image.fromarray(seg.astype(np.uint8))}, num_inference_steps=3, seeds=[5], output_type="pt").images
    assert torch.equal(a, b) and torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(pipe(conditions={}, num_images=2, num_inference_steps=3, generator=g1, output_type="pt").images,
                       pipe(conditions={}, num_images=2, num_inference_steps=3, generator=g2, output_type="pt").images)
    batch = torch.from_numpy(np.stack([seg, seg]))
    assert pipe(conditions={"segmentation": batch}, num_inference_steps=2, output_type="pt").images.shape[0] == 2
    assert pipe(conditions={}, num_inference_steps=2, output_type="pt").images.shape[0] == 1
    assert pipe(conditions={}, num_images=3, num_inference_steps=2, output_type="pt").images.shape[0] == 3
    pil = pipe(conditions={}, num_inference_steps=2, output_type="pil").images
    assert isinstance(pil[0], Image.Image)


def test_pipeline_bad_inputs(pipe):
    seg = torch.randint(0, 6, (16, 16))
    with pytest.raises(ValueError, match="thermal"):
        pipe(conditions={"thermal": seg}, output_type="pt").images
    with pytest.raises(ValueError, match="segmentation"):
        pipe(conditions={"segmentation": torch.full((16, 16), 9)}, output_type="pt").images
    with pytest.raises(ValueError, match="batch sizes differ"):
        pipe(conditions={"segmentation": torch.randint(0, 6, (2, 16, 16)), "depth": torch.rand(3, 1, 16, 16)}, output_type="pt").images
    with pytest.raises(ValueError, match="depth"):
        pipe(conditions={"depth": torch.full((1, 1, 16, 16), float("nan"))}, output_type="pt").images
    with pytest.raises(ValueError, match="modulation_window"):
        pipe(conditions={"segmentation": seg}, modulation_window=(0.8, 0.2), output_type="pt").images


def test_strength_window_and_composition_identities(pipe):
    seg = torch.randint(0, 6, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=3, seeds=[1, 2])
    plain = pipe(conditions={"segmentation": seg}, **kw, output_type="pt").images
    base = pipe(conditions={}, num_images=2, **kw, output_type="pt").images
    assert not torch.allclose(plain, base), "the (perturbed) MCM should change samples"
    assert torch.equal(pipe(conditions={"segmentation": seg}, strength=0.0, **kw, output_type="pt").images, base)
    assert torch.equal(pipe(conditions={"segmentation": seg}, modulation_window=(0.0, 0.0), **kw, output_type="pt").images, base)
    module = pipe.modules[0]
    # one module at weight 1 takes the fast path (no separate base call); a region of ones forces the
    # general composition p_u + 1 * R * (p_1 - p_u): the two must agree (not the same code run twice)
    general = MCMPipeline.from_base(pipe.base, [module], weights=[1.0])(
        conditions=[{"segmentation": seg}], regions=[torch.ones(16, 16)], **kw, output_type="pt").images
    assert torch.allclose(general, plain, atol=1e-5)
    zero = MCMPipeline.from_base(pipe.base, [module, module], weights=[0.0, 0.0])
    assert torch.equal(zero(conditions=[{"segmentation": seg}, {"segmentation": seg}], **kw, output_type="pt").images, base)


def test_guidance_modulates_both_branches_in_one_call(pipe):
    calls = []
    module = pipe.modules[0]
    orig = module.modulation

    def spy(x, p, t, f):
        calls.append(x.shape[0])
        return orig(x, p, t, f)

    module.modulation = spy
    seg = torch.randint(0, 6, (2, 16, 16))
    pipe(conditions={"segmentation": seg}, prompt="a red circle", guidance_scale=3.0, num_inference_steps=2, output_type="pt").images
    assert calls == [4, 4], "one batched MCM call per step over [uncond; cond]"
