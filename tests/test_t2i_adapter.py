"""T2I-Adapter, the third adapter of the one protocol (issue: architecture): one model file, one thin
LightningModule.  It trains only itself (the base's bytes unchanged), exports and reloads, and with the
same weights samples exactly as diffusers' ``StableDiffusionAdapterPipeline``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcm.diffusion.sampling import generators_for
from mcm.models.frozen_base import FrozenBase
from mcm.models.t2i_adapter import T2IAdapterControl
from mcm.pipelines import MCMPipeline, load_module
from mcm.training.export import export_checkpoint
from mcm.training.t2i_adapter_module import T2IAdapterModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
MODS = {"segmentation": {"num_classes": 3}}


def nudge(adapter: T2IAdapterControl) -> T2IAdapterControl:
    """Random features strong enough to change the base's prediction."""
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return adapter.eval()


def batch(n: int, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "segmentation": torch.randint(0, 3, (n, size, size), generator=g), "caption": ["a red circle"] * n}


def test_trains_only_the_adapter_and_the_base_is_unchanged(tiny_sd_dir):
    torch.manual_seed(0)
    m = T2IAdapterModule(base=str(tiny_sd_dir), modalities=MODS, warmup_steps=0)
    before = m.base.content_hash()
    names = [n for n, _ in m.named_parameters()]
    assert names and all(n.startswith("adapter.adapter.") for n in names)
    opt = m.configure_optimizers()["optimizer"]
    first = next(m.adapter.adapter.parameters()).detach().clone()
    m.train()
    for step in range(2):
        opt.zero_grad()
        loss = m.training_step(batch(2, seed=step), step)
        loss.backward()
        assert all(p.grad is not None for p in m.adapter.parameters())
        opt.step()
    assert not torch.equal(first, next(m.adapter.adapter.parameters()))
    assert all(p.grad is None for p in m.base.frozen_parameters())
    m.base._hash = None
    assert m.base.content_hash() == before


def test_export_reload_samples_the_same(tiny_sd_dir, tmp_path):
    torch.manual_seed(0)
    m = T2IAdapterModule(base=str(tiny_sd_dir), modalities=MODS)
    nudge(m.adapter)
    ckpt = {"state_dict": m.state_dict(), "global_step": 3}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "t2i.ckpt")
    out = export_checkpoint(tmp_path / "t2i.ckpt", tmp_path / "export", strength=0.8)
    loaded, info = load_module(out, m.base)
    assert isinstance(loaded, T2IAdapterControl) and loaded.default_strength == 0.8 and info["adapter"] == "t2i_adapter"
    seg = batch(2)["segmentation"]
    kw = dict(conditions={"segmentation": seg}, prompt="a red circle", num_inference_steps=3, seeds=[0, 1],
              output_type="pt")
    live = MCMPipeline.from_base(m.base, [m.adapter])(strength=0.8, **kw).images
    assert torch.equal(MCMPipeline.from_pretrained(out)(**kw).images, live)
    assert not torch.allclose(MCMPipeline.from_base(m.base, [])(prompt="a red circle", num_images=2,
                                                                num_inference_steps=3, seeds=[0, 1], output_type="pt").images, live, atol=1e-3)


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_equals_stable_diffusion_adapter_pipeline(tiny_sd_dir, guidance_scale):
    from diffusers import DDIMScheduler, StableDiffusionAdapterPipeline

    base = FrozenBase.from_pretrained(tiny_sd_dir)
    torch.manual_seed(0)
    adapter = nudge(T2IAdapterControl.from_base(base, MODS))
    sched = DDIMScheduler.from_config(base.scheduler.config)
    ref = StableDiffusionAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                         unet=base.unet, adapter=adapter.adapter, scheduler=sched,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    seg = batch(2)["segmentation"]
    control = F.one_hot(seg, 3).permute(0, 3, 1, 2).float()
    prompts = ["a red circle", "a blue square"]
    expected = ref(prompt=prompts, image=control, num_inference_steps=4, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(0), output_type="np").images  # (B, H, W, 3) floats
    pipe = MCMPipeline.from_base(base, [adapter], scheduler=DDIMScheduler.from_config(base.scheduler.config))
    got = pipe(conditions={"segmentation": seg}, prompt=prompts, num_inference_steps=4,
               guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert float(abs(got - expected).max()) < 1e-5
    assert generators_for(None, None) is None
