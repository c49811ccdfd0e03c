"""The training step reads nothing back from the device once a fit is past its first batches (issue: correctness,
item 2): no ``.item()``, ``bool(tensor)``, ``tolist()``, ``float(tensor)``... in the step, which on a GPU would
wait for every queued kernel (a host synchronisation per step: small next to an SD forward, large next to a step
from cached predictions).  Values are checked by the DataModule per sample, and by the step on the first
``value_check_batches`` batches of a fit and on any batch given outside a Trainer.

On the CPU this is checked by making every tensor -> Python conversion raise during the step; on a lent GPU by
``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import modalities
from mcm.models.frozen_base import FrozenBase
from mcm.training.mcm_module import MCMModule

ALL = {"segmentation": {"num_classes": 6}, "sketch": {"region_hints": True}, "depth": {},
       "partial_mask": {"num_classes": 6}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)
#: tensor -> Python reads (``.numpy()`` is allowed: it refuses a device tensor, so it only reads CPU-drawn ones)
CONVERSIONS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__")


@pytest.fixture(scope="module")
def shapes32():
    return FrozenBase.from_pretrained("shapes32")


def module_in_a_fit(base, device: str = "cpu") -> MCMModule:
    torch.manual_seed(0)
    with mock.patch.object(FrozenBase, "from_pretrained", lambda *a, **k: base):
        module = MCMModule(base="shapes32", modalities=ALL, **SMALL, caption_dropout=0.3, modality_dropout=0.3,
                           single_modality_prob=0.2, map_loss_weight=1.0)
    module._trainer = mock.MagicMock()  # inside a fit (the step logs nothing here)
    return module.train().to(device)


def batch(base, cached: bool, B: int = 4, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    S = base.sample_size[0]
    out = {"image": torch.rand(B, 3, S, S, generator=g) * 2 - 1, "caption": ["a red circle", ""] * (B // 2),
           "key": [f"s{i}" for i in range(B)]}
    out.update({n: modalities.get(n, **o).example(B, S, S, g) for n, o in ALL.items()})
    if cached:
        C = base.latent_channels
        out["pred_t"] = torch.randint(0, 1000, (B, 1), generator=g)
        out.update({n: torch.randn(B, 1, C, S, S, generator=g) for n in ("xt", "target", "pred", "pred_uncond")})
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _no_conversion(self, *args, **kwargs):
    raise AssertionError(f"a tensor of shape {tuple(self.shape)} was read back in the training step")


@pytest.mark.parametrize("cached", [True, False], ids=["from_cached_predictions", "online"])
def test_no_value_is_read_back_after_the_first_batches(shapes32, cached):
    module = module_in_a_fit(shapes32)
    b = batch(shapes32, cached)
    for _ in range(module.value_check_batches):  # the first batches of a fit: values checked
        module._common_step(b, "train")
    with mock.patch.multiple(torch.Tensor, **{n: _no_conversion for n in CONVERSIONS}):
        loss = module._common_step(b, "train")
    assert torch.isfinite(loss)
    # the first batches did check the values: a NaN image is named there, and outside a Trainer always
    fresh = module_in_a_fit(shapes32)
    bad = {**b, "image": torch.full_like(b["image"], float("nan"))}
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected finite values"):
        fresh._common_step(bad, "train")
    fresh._trainer = None
    fresh._checked_batches = 10
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected finite values"):
        fresh._common_step(bad, "train")


def test_shapes_are_still_checked_without_reading_values(shapes32):
    module = module_in_a_fit(shapes32)
    module._checked_batches = module.value_check_batches  # past the first batches
    b = batch(shapes32, cached=True)
    with pytest.raises(ValueError, match=r"modality 'sketch': expected 4 map\(s\) of 32x32"):
        module._common_step({**b, "sketch": b["sketch"][:2]}, "train")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cached", [True, False], ids=["from_cached_predictions", "online"])
def test_no_host_sync_on_cuda(shapes32, cached):
    base = FrozenBase.from_pretrained("shapes32").to("cuda")
    module = module_in_a_fit(base, "cuda")
    b = batch(base, cached, device="cuda")
    for _ in range(module.value_check_batches + 1):
        module._common_step(b, "train")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module._common_step(b, "train")
    finally:
        torch.cuda.set_sync_debug_mode("default")
