"""One registry per kind: base families are looked up, never listed by hand (issue: registries).  A family from
a test-only module is registered at run time and goes through loading, sampling, training, export and reload
with no change to ``mcm/``; the built-ins are found through the ``mcm.families`` entry points."""
from __future__ import annotations

import shutil
from unittest import mock

import pytest
import torch

from mcm.models import families
from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline, save_module


def test_builtin_families_come_from_entry_points(tiny_sd_dir, tiny_sdxl_dir, tiny_dit_dir, tiny_sd3_dir):
    assert {"sd", "sdxl", "dit", "sd3"} <= set(families.list_families())
    for name, path in (("sd", tiny_sd_dir), ("sdxl", tiny_sdxl_dir), ("dit", tiny_dit_dir), ("sd3", tiny_sd3_dir)):
        assert families.detect_family(path) == name
        assert FrozenBase.from_pretrained(path).family == name
    with pytest.raises(ValueError, match=r"unknown base family 'sdx'; registered: .*Did you mean 'sdxl'"):
        families.get_family("sdx")


def test_a_family_registered_outside_mcm_samples_trains_exports_and_reloads(tiny_uncond_dir, tmp_path):
    from toy_family import MARKER, ToyBase

    from mcm.training.mcm_module import MCMModule

    toy_dir = tmp_path / "toy_base"
    shutil.copytree(tiny_uncond_dir, toy_dir)
    assert families.detect_family(toy_dir) == "sd"  # before registration, the built-in claims it
    (toy_dir / MARKER).write_text("{}")
    with pytest.raises(ValueError, match="no registered base family claims it"):
        families.detect_family(toy_dir.parent)
    families.register_family(ToyBase)
    try:
        assert "toy" in families.list_families() and families.detect_family(toy_dir) == "toy"  # derived wins
        base = FrozenBase.from_pretrained(toy_dir)
        assert isinstance(base, ToyBase)
        pipe = MCMPipeline.from_pretrained(toy_dir, modules=[])
        pipe.set_progress_bar_config(disable=True)
        assert pipe(num_inference_steps=2, output_type="pt").images.shape == (1, 3, 8, 8)  # the toy's size
        # train a step, export, reload and sample with the module
        module = MCMModule(base=str(toy_dir), modalities={"segmentation": {"num_classes": 6}},
                           block_out_channels=(8, 16), layers_per_block=1, attention_levels=(), norm_num_groups=4,
                           lr=1e-2, warmup_steps=0, modality_dropout=0.0, drop_all_prob=0.0)
        assert isinstance(module.base, ToyBase)
        g = torch.Generator().manual_seed(0)
        batch = {"image": torch.rand(2, 3, 8, 8, generator=g) * 2 - 1,
                 "segmentation": torch.randint(0, 6, (2, 8, 8), generator=g)}
        opt = module.configure_optimizers()["optimizer"]
        module._common_step(batch, "train").backward()
        opt.step()
        save_module(module.mcm, tmp_path / "export", {"source": str(toy_dir), "hash": module.base.content_hash()})
        reloaded = MCMPipeline.from_pretrained(tmp_path / "export")
        reloaded.set_progress_bar_config(disable=True)
        assert isinstance(reloaded.base, ToyBase)
        maps = torch.randint(0, 6, (1, 8, 8), generator=g)
        out = reloaded(conditions={"segmentation": maps}, num_inference_steps=2, seeds=[0], output_type="pt").images
        live = MCMPipeline.from_base(module.base, [module.mcm.eval()])
        live.set_progress_bar_config(disable=True)
        assert torch.equal(out, live(conditions={"segmentation": maps}, num_inference_steps=2, seeds=[0],
                                     output_type="pt").images)
    finally:
        families.unregister_family("toy")
    assert families.detect_family(toy_dir) == "sd"


def test_register_family_refuses_what_is_not_a_frozen_base():
    with pytest.raises(TypeError, match="expected a subclass of mcm.models.frozen_base.FrozenBase"):
        families.register_family(type("NotABase", (), {"family": "x"}))
    with mock.patch.object(families, "_entry_points", return_value={}):
        with pytest.raises(ValueError, match="registered: \\[\\]"):
            families.get_family("sd")


def test_an_adapter_kind_registered_outside_mcm_samples_exports_and_reloads(tiny_pixel_base_dir, tmp_path):
    """A toy adapter kind: sampled in a pipeline, exported from a checkpoint, reloaded by its export's marker and
    labelled by its display name, with no change to ``mcm/`` (every adapter list there is a registry lookup)."""
    from toy_adapter import TOY_KIND, ToyAdapter

    from mcm.models import adapter_kinds
    from mcm.pipelines.grids import adapter_display_name
    from mcm.training.export import adapter_from_checkpoint

    base = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    toy = ToyAdapter(default_strength=2.0).eval()
    with torch.no_grad():
        toy.w.fill_(0.25)
    depth = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(conditions={"depth": depth}, num_inference_steps=2, seeds=[0], output_type="pt")
    with pytest.raises(ValueError, match="adapter kind 'toy' is unknown"):
        adapter_kinds.get_adapter_kind("toy")
    adapter_kinds.register_adapter_kind(TOY_KIND)
    try:
        live = MCMPipeline.from_base(base, [toy])
        live.set_progress_bar_config(disable=True)
        want = live(**kw).images
        assert adapter_display_name(toy) == "Toy" and adapter_kinds.kind_of(toy).name == "toy"
        # a checkpoint as its LightningModule would write it -> the export, then reload by the marker
        ckpt = {"toy_config": dict(toy.config), "state_dict": {f"toy.{k}": v for k, v in toy.state_dict().items()}}
        rebuilt, kind = adapter_from_checkpoint(ckpt)
        assert kind == "toy" and float(rebuilt.w) == 0.25
        save_module(rebuilt, tmp_path / "toy_export", {"source": str(tiny_pixel_base_dir),
                                                       "hash": base.content_hash()})
        reloaded = MCMPipeline.from_pretrained(tmp_path / "toy_export")
        reloaded.set_progress_bar_config(disable=True)
        assert isinstance(reloaded.modules[0], ToyAdapter)
        assert torch.equal(reloaded(**kw).images, want)
        plain = MCMPipeline.from_base(base, [])
        plain.set_progress_bar_config(disable=True)
        assert not torch.equal(plain(num_images=1, num_inference_steps=2, seeds=[0], output_type="pt").images, want)
    finally:
        adapter_kinds.unregister_adapter_kind("toy")
    with pytest.raises(ValueError, match="no adapter kinds claim this export"):
        adapter_kinds.kind_of_export(tmp_path / "toy_export")
