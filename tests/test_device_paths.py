"""The GPU paths (issue 28 item 7), on every device the machine has: the CPU always, CUDA where one is visible
(``pytest -m cuda``, as ``bench/gpu_suite.sh`` runs them on a lent GPU; skipped elsewhere).

- a bf16 training step on every family's tiny base: the frozen base in bfloat16 (``base_dtype``), the step
  under bf16 autocast as Lightning's ``bf16-mixed`` runs it, the MCM's weights and AdamW state in fp32;
- the sampling oracle: a zero-initialised MCM through ``MCMPipeline`` equals diffusers' own
  ``StableDiffusionPipeline`` on the same device, same seed.  Tolerance: 1e-5 (max abs, images in [0, 1]) on
  the CPU, where both run the same kernels in the same order; 1e-3 on CUDA, where cuDNN may pick
  different convolution algorithms for the two calls (both run in fp32; TF32 is off by PyTorch's default
  for matmuls, on for cuDNN convolutions).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline
from mcm.training.mcm_module import MCMModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # steps run without a Trainer
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}
SEG = {"segmentation": {"num_classes": 6}}
SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(), norm_num_groups=4)
#: family -> (its tiny directory's fixture, a training image size)
FAMILIES = {"sd": ("tiny_sd_dir", 64), "sdxl": ("tiny_sdxl_dir", 16), "sd3": ("tiny_sd3_dir", 16),
            "dit": ("tiny_dit_dir", 16), "pixel": ("tiny_pixel_base_dir", 16),
            "pixart_sigma": ("tiny_pixart_sigma_dir", 16), "flux": ("tiny_flux_dir", 32),
            "flux2": ("tiny_flux2_dir", 32),
            "qwenimage": ("tiny_qwenimage_dir", 32), "sana": ("tiny_sana_dir", 16),
            "zimage": ("tiny_zimage_dir", 32)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_training_step_on_every_family(family, device, request):
    fixture, S = FAMILIES[family]
    torch.manual_seed(0)
    module = MCMModule(base=str(request.getfixturevalue(fixture)), base_dtype="bfloat16", modalities=SEG, **SMALL,
                       modality_dropout=0.0, drop_all_prob=0.0, warmup_steps=0, lr=1e-3).to(device).train()
    # the denoiser in bf16 (a T5 encoder keeps its `wo` layers in fp32, as transformers does)
    assert {p.dtype for p in module.base.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.mcm.parameters()} == {torch.float32}
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # a gradient reaches every layer
    g = torch.Generator().manual_seed(0)
    batch = {"image": (torch.rand(2, 3, S, S, generator=g) * 2 - 1).to(device), "caption": ["a ring", ""],
             "key": ["a", "b"], "segmentation": torch.randint(0, 6, (2, S, S), generator=g).to(device),
             "class_label": torch.tensor([1, 3], device=device)}
    optimizer = module.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in module.mcm.parameters()]
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = module._common_step(batch, "train")
    loss.backward()
    grads = [p.grad for p in module.mcm.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(p.grad is None for p in module.base.frozen_parameters())  # the base takes no gradient
    optimizer.step()
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, module.mcm.parameters()))
    assert changed == len(before), f"{changed} of {len(before)} MCM tensors moved"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_zero_module_sampling_equals_diffusers_on_the_device(tiny_sd_dir, device, guidance_scale):
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    sd = sd.to(device)
    sd.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    zero = MultimodalConditioningModule(latent_channels=4, modalities={"segmentation": {"num_classes": 3}},
                                        downsample=8, block_out_channels=(16, 32), layers_per_block=1,
                                        attention_levels=(), norm_num_groups=8).eval().to(device)
    ours = MCMPipeline.from_pipe(sd, modules=[zero])
    ours.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 3, (2, 128, 64), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(prompt=["a red circle", "a ring"], num_inference_steps=3, guidance_scale=guidance_scale, height=128,
              width=64, output_type="pt")
    ref = sd(**kw, generator=torch.Generator(device).manual_seed(0)).images
    got = ours(conditions={"segmentation": labels}, **kw, generator=torch.Generator(device).manual_seed(0)).images
    assert got.shape == ref.shape == (2, 3, 128, 64)
    assert float((got.float() - ref.float()).abs().max()) <= TOLERANCE[device]
