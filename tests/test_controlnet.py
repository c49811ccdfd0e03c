"""ControlNet baseline (docs/concepts.md#baselines): trains through the frozen UNet without changing it, the
conditioning embedding downsamples like the base, zero-conv no-op at init, checkpoint/export/
reload/sample round trip, ``mcm evaluate`` on an exported ControlNet."""
from __future__ import annotations

import json

import pytest
import torch

import modalities
from mcm.models.controlnet import ADAPTER_FILE, ControlNetAdapter, embedding_channels_for
from mcm.training.controlnet_module import ControlNetModule
from mcm.training.export import export_checkpoint
from mcm.models.frozen_base import FrozenBase
from mcm.models.frozen_base import BaseMismatchError
from mcm.pipelines import MCMPipeline, load_module

MODS = {"segmentation": {"num_classes": 6}, "sketch": {}}
IMAGE_SIZE = {"pixel": 16, "sd": 64}  # tiny pixel base: 16x16 pixels; tiny SD: 64x64 images -> 8x8 latents


def make_batch(B: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(B, 3, size, size, generator=g) * 2 - 1, "caption": ["a red circle"] * B}
    for name, opts in MODS.items():
        batch[name] = modalities.get(name, **opts).example(B, size, size, g)
    return batch


@pytest.fixture(params=["pixel", "sd"])
def kind(request):
    return request.param


@pytest.fixture
def base_dir(kind, tiny_pixel_base_dir, tiny_sd_dir):
    return tiny_pixel_base_dir if kind == "pixel" else tiny_sd_dir


@pytest.fixture
def module(base_dir):
    torch.manual_seed(0)
    return ControlNetModule(base=str(base_dir), modalities=MODS, warmup_steps=0)


def nudge(adapter: ControlNetAdapter, std: float = 0.05) -> None:
    """Move the zero convolutions off zero so the ControlNet changes the base's prediction."""
    cn = adapter.controlnet
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.normal_(0, std)


def test_trains_only_the_controlnet_and_base_is_unchanged(module, kind):
    base = module.base
    base._hash = None
    before = base.content_hash()
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith("adapter.controlnet.") for n in names)
    assert not any(k.startswith("base") for k in module.state_dict())
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.adapter.parameters()}
    assert not in_opt & {id(p) for p in base.frozen_parameters()}, "a base parameter is in the optimizer"
    zero_conv = module.adapter.controlnet.controlnet_mid_block.weight
    assert torch.count_nonzero(zero_conv) == 0
    module.train()
    for step in range(2):
        opt.zero_grad()
        loss = module.training_step(make_batch(2, IMAGE_SIZE[kind], seed=step), step)
        assert torch.isfinite(loss)
        loss.backward()
        assert zero_conv.grad is not None and zero_conv.grad.abs().sum() > 0, "no gradient reached the ControlNet"
        opt.step()
    assert torch.count_nonzero(zero_conv) > 0, "the zero convolution did not train"
    assert all(p.grad is None and not p.requires_grad for p in base.frozen_parameters())
    assert not base.training
    base._hash = None
    assert base.content_hash() == before, "the base changed during ControlNet training"


def test_conditioning_embedding_matches_the_first_feature_map(module, kind):
    base, adapter = module.base, module.adapter
    widths = adapter.controlnet.config.conditioning_embedding_out_channels
    assert tuple(widths) == ((16,) if kind == "pixel" else (16, 32, 96, 256))
    batch = make_batch(2, IMAGE_SIZE[kind])
    x0 = base.encode_images(batch["image"])
    cond = adapter.encode_conditions({n: batch[n] for n in MODS}, None, tuple(x0.shape[-2:]), 2)
    assert cond.shape == (2, 6 + 1, IMAGE_SIZE[kind], IMAGE_SIZE[kind])  # one-hot K=6 + sketch, image resolution
    emb = adapter.controlnet.controlnet_cond_embedding(cond)
    first = base.unet.conv_in(x0)
    assert emb.shape == first.shape


def test_zero_init_is_an_exact_noop(module, kind):
    base, adapter = module.base, module.adapter
    batch = make_batch(2, IMAGE_SIZE[kind])
    x = torch.randn(2, base.latent_channels, *base.encode_images(batch["image"]).shape[-2:])
    t = torch.tensor([10, 900])
    text = base.encode_text(batch["caption"])
    cond = adapter.encode_conditions({n: batch[n] for n in MODS}, None, tuple(x.shape[-2:]), 2)
    with torch.no_grad():
        assert torch.equal(adapter.controlled_prediction(base, x, t, text, cond), base.predict(x, t, text))


def test_modality_dropout_zeroes_the_conditioning(module):
    batch = make_batch(3, 16)
    present = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # columns: segmentation, sketch
    size = (16 // module.base.downsample,) * 2
    cond = module.adapter.encode_conditions({n: batch[n] for n in MODS}, present, size, 3)
    assert cond[0, 6:].abs().sum() == 0 and cond[0, :6].abs().sum() > 0
    assert cond[1, :6].abs().sum() == 0
    assert cond[2].abs().sum() == 0


def test_unconditional_base_and_wrong_downsampling_are_refused(tiny_uncond_dir, tiny_pixel_base_dir):
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        ControlNetModule(base=str(tiny_uncond_dir), modalities=MODS)
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels"):  # x2 on a pixel base
        ControlNetModule(base=str(tiny_pixel_base_dir), modalities=MODS, conditioning_embedding_out_channels=(16, 32))
    assert embedding_channels_for(1) == (16,) and embedding_channels_for(8) == (16, 32, 96, 256)
    with pytest.raises(ValueError, match="downsample"):
        embedding_channels_for(3)


def test_checkpoint_export_reload_sample(module, kind, base_dir, tmp_path, tiny_uncond_dir):
    nudge(module.adapter)
    ckpt = {"state_dict": module.state_dict(), "global_step": 5}
    module.on_save_checkpoint(ckpt)
    # the recorded hash is the base's content: the directory loaded afresh gives it, a nudged copy does not
    assert ckpt["mcm_base"]["hash"] == FrozenBase.from_pretrained(base_dir).content_hash()
    nudged = FrozenBase.from_pretrained(base_dir)
    with torch.no_grad():
        next(iter(nudged.frozen_parameters())).view(-1)[0] += 1e-3
    assert nudged.content_hash() != ckpt["mcm_base"]["hash"]
    torch.save(ckpt, tmp_path / "cn.ckpt")
    out = export_checkpoint(tmp_path / "cn.ckpt", tmp_path / "export")
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", ADAPTER_FILE, "mcm_base.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(out)  # a plain diffusers ControlNet directory
    loaded, info = load_module(out, module.base)
    assert isinstance(loaded, ControlNetAdapter) and info["adapter"] == "controlnet"
    assert loaded.modality_names == module.adapter.modality_names
    theirs = loaded.state_dict()
    for n, a in module.adapter.state_dict().items():
        assert torch.equal(a, theirs[n]), n
    # refuses another base unless forced
    with pytest.raises(BaseMismatchError, match="force_base"):
        load_module(out, FrozenBase.from_pretrained(tiny_uncond_dir))
    object.__setattr__(module, "base", FrozenBase.from_pretrained(tiny_uncond_dir))
    with pytest.raises(BaseMismatchError):
        module.on_load_checkpoint(ckpt)
    # sampling through MCMPipeline, with and without guidance
    pipe = MCMPipeline.from_pretrained(out)
    size = IMAGE_SIZE[kind]
    seg = modalities.get("segmentation", num_classes=6).example(2, size, size, torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=2, seeds=[0, 1])
    ctrl = pipe(conditions={"segmentation": seg}, **kw, output_type="pt").images
    base = pipe(conditions={}, num_images=2, **kw, output_type="pt").images
    assert ctrl.shape == (2, 3, size, size) and torch.isfinite(ctrl).all()
    assert not torch.allclose(ctrl, base)
    assert torch.equal(pipe(conditions={"segmentation": seg}, strength=0.0, **kw, output_type="pt").images, base)  # conditioning scale 0
    assert torch.equal(pipe(conditions={"segmentation": seg}, modulation_window=(0.0, 0.0), **kw, output_type="pt").images, base)
    g = pipe(conditions={"segmentation": seg}, prompt="a red circle", guidance_scale=3.0, **kw, output_type="pt").images
    assert torch.isfinite(g).all() and not torch.allclose(g, ctrl, atol=1e-3)
    if pipe.base.is_text_conditional:
        # the empty prompt's two branches are the same, so u + 3 (c - u) = u: guidance changes nothing
        empty = pipe(conditions={"segmentation": seg}, prompt="", guidance_scale=3.0, **kw, output_type="pt").images
        assert torch.allclose(empty, pipe(conditions={"segmentation": seg}, prompt="", **kw, output_type="pt").images, atol=1e-5)


def test_guidance_runs_the_controlnet_once_per_step_on_both_branches(module):
    nudge(module.adapter)
    pipe = MCMPipeline.from_base(module.base, [module.adapter])
    calls, orig = [], module.adapter.residuals

    def spy(x, t, emb, cond, scale=1.0, base=None):
        calls.append((x.shape[0], emb.shape[0], cond.shape[0]))
        return orig(x, t, emb, cond, scale, base)

    module.adapter.residuals = spy
    seg = torch.randint(0, 6, (2, 16, 16)) if module.base.downsample == 1 else torch.randint(0, 6, (2, 64, 64))
    pipe(conditions={"segmentation": seg}, prompt="a red circle", guidance_scale=3.0, num_inference_steps=2, output_type="pt").images
    n_evals = len(pipe.scheduler.timesteps)  # DDIM: 2; the tiny SD's own PNDM: 3 (n + 1 with its warm-up)
    assert calls == [(4, 4, 4)] * n_evals, "one batched ControlNet call per step over [uncond; cond]"


def test_fit_with_trainer_then_export_and_evaluate(tiny_pixel_base_dir, tmp_path):
    """Lightning Trainer, tiny shards, 2 steps; the checkpoint exports and `mcm evaluate` reads the export."""
    import lightning as L

    from datamodules import ShardDataModule
    from datamodules.shapes import write_shapes_shards
    from mcm.cli.tool_commands import run_tool_command

    write_shapes_shards(tmp_path / "data", train=16, val=8, size=16, shard_size=8, workers=1)
    mods = {"segmentation": {"num_classes": 6}}
    dm = ShardDataModule(train_shards=str(tmp_path / "data" / "train-*.tar"),
                         val_shards=str(tmp_path / "data" / "val-*.tar"), modalities=mods, image_size=16,
                         batch_size=4, num_workers=0)
    torch.manual_seed(0)
    model = ControlNetModule(base=str(tiny_pixel_base_dir), modalities=mods, warmup_steps=1, ema_decay=0.9,
                             num_val_samples=2, val_sample_steps=2)
    model.base._hash = None
    before = model.base.content_hash()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=2, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert len(list((tmp_path / "samples").glob("val_samples_step*.png"))) == 1  # conditions | base | ControlNet
    pred = model.predict_step(next(iter(dm.val_dataloader())), 0)
    assert pred["grid"].shape == (3 * 4, 3, 16, 16) and pred["modalities"] == ["segmentation"]
    model.base._hash = None
    assert model.base.content_hash() == before
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "export")
    assert json.loads((out / "mcm_base.json").read_text())["hash"] == before
    assert run_tool_command(["evaluate", "--mcm", str(out), "--data", str(tmp_path / "data" / "val-*.tar"),
                             "--n", "4", "--steps", "2", "--seeds", "0", "--batch-size", "4", "--threads", "1",
                             "--seg-judge", "shapes32-segmentation",  # a tiny base: no judge of its own
                             "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["settings"][0]["modalities"] == ["segmentation"]
    assert isinstance(report["settings"][0]["metrics"]["seg_miou"], float)
