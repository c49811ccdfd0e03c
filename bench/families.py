"""Cost on the real SDXL, SD3, FLUX.1 and Qwen-Image architectures (random weights, full width): MCM vs the base,
ControlNet where it exists and fits, and the base-free step.

    python bench/families.py --models sdxl,sd3 --latent 32 --json docs/bench/families.json
    python bench/families.py --models sdxl,flux,qwenimage --base-free --json docs/bench/families_base_free.json

FLUX.1 (12B) and Qwen-Image (20B) do not fit this machine's memory in bf16: they are built at full width with
fewer blocks (``--flux-blocks 4,8``: 4 double-stream + 8 single-stream of FLUX.1's 19 + 38; ``--qwen-layers 8`` of
Qwen-Image's 60); the MCM's cost does not grow with depth, so its ratio to a base forward only falls with more.

``--base-free``: in a second fresh process per family, the MCM training step from cached base predictions with the
denoiser built from its config on the ``meta`` device (no weight allocated), as ``mcm fit`` runs when every shard
carries cached predictions: its time and peak memory next to a base forward and the base's inference peak.

Per family, through the project's own code path (``FrozenBase`` subclass, ``MCMModule._common_step``,
``ControlNetAdapter``): **A** one base forward (bf16 base, no grad), **B** one MCM training step (the paper's
MCM, fp32, AdamW; the base under no_grad) and, where the family has one, **C** one ControlNet training step
(``ControlNetModel.from_unet`` for SDXL; ``SD3ControlNetModel`` / ``FluxControlNetModel`` /
``QwenImageControlNetModel`` as ``ControlNetAdapter.from_base`` builds them: fp32 with autocast, backward
through the frozen denoiser) — if its weights,
gradients and AdamW state fit in this machine's memory; otherwise the memory it would need is given
from its parameter count.  Latents and text embeddings are cached (random), as ``mcm data encode``
would give them.  Steps run interleaved (A B C A B); medians.  Peak memory: peak RSS above the
interpreter in a fresh process per family (``bench/common.PeakMemory``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from mcm.models.frozen_base import FrozenBase  # noqa: E402

PAPER_MCM = {"block_out_channels": (32, 32, 64, 128), "layers_per_block": 2, "attention_levels": (2,)}
SEG = {"segmentation": {"num_classes": 6}}
TAG = "FAMILY_JSON="


def denoiser(cls, meta: bool, **config):
    """The denoiser of ``config``; with ``meta``, built on the ``meta`` device and marked as a skeleton whose
    weights were never read, as ``FrozenBase.from_pretrained(denoiser_weights=False)`` builds it."""
    if not meta:
        return cls(**config)
    with torch.device("meta"):
        model = cls(**config)
    model.mcm_weights_dir = (Path("/nonexistent"), "transformer")  # never loaded in a base-free step
    return model


def _x8_vae():
    """A VAE config with SD's x8 factor (latents are cached, so its weights are never used for the steps)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build(family: str, latent: int, tiny: bool, blocks: dict | None = None, meta: bool = False):
    """(base, context for a batch of 1). SDXL base 1.0 / SD3 medium architectures, built directly in bf16."""
    torch.set_default_dtype(torch.bfloat16)  # 2-3B parameters: never materialise them in fp32
    try:
        return _build(family, latent, tiny, blocks or {}, meta)
    finally:
        torch.set_default_dtype(torch.float32)


def _build(family: str, latent: int, tiny: bool, blocks: dict, meta: bool):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if family in ("flux", "qwenimage"):
        return _build_packed(family, latent, tiny, blocks, meta)
    if family == "sdxl":
        from mcm.models.base_sdxl import SDXLBase

        w = (32, 64, 128) if tiny else (320, 640, 1280)
        unet = denoiser(UNet2DConditionModel, meta,
            sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=w,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 1) if tiny else (1, 2, 10), attention_head_dim=(2, 4, 8) if tiny
            else (5, 10, 20), cross_attention_dim=64 if tiny else 2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8 if tiny else 256,
            projection_class_embeddings_input_dim=(6 * 8 + 32) if tiny else 2816, norm_num_groups=8 if tiny else 32)
        base = SDXLBase(unet, EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
                        _x8_vae(), source="sdxl-random")
        ctx = {"prompt_embeds": torch.randn(1, 77, 64 if tiny else 2048, dtype=torch.float32),
               "text_embeds": torch.randn(1, 32 if tiny else 1280, dtype=torch.float32),
               "time_ids": torch.tensor([[latent * 8.0, latent * 8.0, 0, 0, latent * 8.0, latent * 8.0]])}
        return base, ctx
    from mcm.models.base_sd3 import SD3Base

    cfg = dict(sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if tiny else 24,
               attention_head_dim=8 if tiny else 64, num_attention_heads=2 if tiny else 24,
               joint_attention_dim=32 if tiny else 4096, caption_projection_dim=16 if tiny else 1536,
               pooled_projection_dim=32 if tiny else 2048, pos_embed_max_size=max(latent // 2 + 8, 96 if tiny else 192))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    base = SD3Base(denoiser(SD3Transformer2DModel, meta, **cfg), FlowMatchEulerDiscreteScheduler(shift=3.0), vae,
                   source="sd3-random")
    ctx = {"prompt_embeds": torch.randn(1, 77 + 256, cfg["joint_attention_dim"], dtype=torch.float32),
           "pooled": torch.randn(1, cfg["pooled_projection_dim"], dtype=torch.float32)}
    return base, ctx


def _build_packed(family: str, latent: int, tiny: bool, blocks: dict, meta: bool):
    """FLUX.1-dev / Qwen-Image at full width (or tiny), with ``blocks`` of their depth; x8 VAEs, 16 channels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    heads, head_dim = (2, 16) if tiny else (24, 128)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from mcm.models.base_flux import FluxBase

        double, single = blocks.get("flux", (1, 1) if tiny else (4, 8))
        transformer = denoiser(FluxTransformer2DModel, meta, patch_size=1, in_channels=64, num_layers=double,
                               num_single_layers=single, attention_head_dim=head_dim, num_attention_heads=heads,
                               joint_attention_dim=32 if tiny else 4096, pooled_projection_dim=32 if tiny else 768,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6) if tiny else (16, 56, 56))
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        base = FluxBase(transformer, sched, vae, source=f"flux-random-{double}+{single}-blocks")
        ctx = {"prompt_embeds": torch.randn(1, 512, 32 if tiny else 4096, dtype=torch.float32),
               "pooled": torch.randn(1, 32 if tiny else 768, dtype=torch.float32)}
        return base, ctx
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from mcm.models.base_qwenimage import QwenImageBase

    layers = blocks.get("qwenimage", (1,) if tiny else (8,))[0]
    transformer = denoiser(QwenImageTransformer2DModel, meta, patch_size=2, in_channels=64, out_channels=16,
                           num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                           joint_attention_dim=32 if tiny else 3584, guidance_embeds=False,
                           axes_dims_rope=(4, 6, 6) if tiny else (16, 56, 56))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    base = QwenImageBase(transformer, sched, vae, source=f"qwenimage-random-{layers}-layers")
    n = 64  # a prompt of 64 tokens after the template's are dropped
    ctx = {"prompt_embeds": torch.randn(1, n, 32 if tiny else 3584, dtype=torch.float32),
           "prompt_embeds_mask": torch.ones(1, n, dtype=torch.long)}
    return base, ctx


def setup(family: str, a):
    base, ctx = build(family, a.latent, a.tiny, parse_blocks(a))
    base._apply(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t)  # MCMModule(base_dtype=bfloat16)
    base.to(a.device)
    S = a.latent * 8
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(1, 3, S, S, generator=g) * 2 - 1,
             "segmentation": torch.randint(0, 6, (1, S, S), generator=g),
             "latent": torch.randn(1, base.latent_channels, a.latent, a.latent, generator=g), "text_emb": ctx}
    to = (lambda v: v.to(a.device) if torch.is_tensor(v) else {k: x.to(a.device) for k, x in v.items()})
    return base, {k: to(v) for k, v in batch.items()}


def parse_blocks(a) -> dict:
    flux = tuple(int(v) for v in a.flux_blocks.split(","))
    return {"flux": flux, "qwenimage": (int(a.qwen_layers),)}


def base_free_child(family: str, a) -> dict:
    """The MCM step from cached predictions with the denoiser a config on the ``meta`` device: time and peak RSS."""
    mem = C.PeakMemory(a.device)
    blocks = parse_blocks(a)
    base, _ = build(family, a.latent, a.tiny, blocks, meta=True)  # the denoiser's config only, on meta
    assert not base.denoiser_loaded
    base = base.to(a.device)
    S, C_, h = a.latent * base.downsample, base.latent_channels, a.latent
    g = torch.Generator().manual_seed(0)
    fp = mcm_fp(base)
    batch = {"image": torch.rand(1, 3, S, S, generator=g) * 2 - 1,
             "segmentation": torch.randint(0, 6, (1, S, S), generator=g),
             "pred_t": fp.sample_timesteps(1, "cpu").view(1, 1).float(),
             **{k: torch.randn(1, 1, C_, h, h, generator=g) for k in ("xt", "target", "pred", "pred_uncond")}}
    batch = {k: v.to(a.device) for k, v in batch.items()}
    module, opt = mcm_module(base)
    out = {"peak_base_free_step": mem.measure(lambda: C.mcm_step(module, opt, batch))}
    mem.release()
    out["times"] = C.interleaved({"base_free_step": lambda: C.mcm_step(module, opt, batch)}, a.reps, 1, a.device)
    out["denoiser_loaded"] = base.denoiser_loaded
    return out


def mcm_module(base):
    from mcm.training.mcm_module import MCMModule

    with mock.patch.object(FrozenBase, "from_pretrained", lambda *x, **k: base):
        m = MCMModule(base="in-memory", modalities=SEG, caption_dropout=0.0, **PAPER_MCM)
    m.to(base.device)
    return m, m.configure_optimizers()["optimizer"]


def base_forward(base, batch):
    fp = mcm_fp(base)
    t = fp.sample_timesteps(1, batch["latent"].device)
    return base.predict(fp.add_noise(batch["latent"], torch.randn_like(batch["latent"]), t), t, batch["text_emb"])


_FORWARD: dict[int, object] = {}


def mcm_fp(base):
    """The base's training forward process, built once per base (not timed with every step)."""
    from mcm.diffusion.forward_process import forward_process_for

    if id(base) not in _FORWARD:
        _FORWARD[id(base)] = forward_process_for(base.scheduler)
    return _FORWARD[id(base)]


def controlnet_params(base) -> int | None:
    """Trainable parameters of the family's ControlNet baseline, built on the meta device (nothing allocated; the
    copy of the base's weights into it is a no-op there); ``None`` where the family has none."""
    import warnings

    from mcm.models.controlnet import ControlNetAdapter

    if base.controlnet_kind is None and base.no_controlnet_reason:
        return None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... to a meta parameter is a no-op"
        return sum(p.numel() for p in ControlNetAdapter.from_base(base, SEG).parameters())


def controlnet_parts(base):
    from mcm.models.controlnet import ControlNetAdapter

    adapter = ControlNetAdapter.from_base(base, SEG).to(base.device)
    from mcm.training.adapter_module import adamw

    return adapter, adamw(adapter.parameters(), lr=1e-5)


def controlnet_step(base, adapter, opt, batch):
    fp = mcm_fp(base)
    x0 = batch["latent"]
    noise, t = torch.randn_like(x0), fp.sample_timesteps(1, x0.device)
    x_t = fp.add_noise(x0, noise, t)
    state = adapter.encode_conditions({"segmentation": batch["segmentation"]}, None, tuple(x0.shape[-2:]), 1)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16):
        pred = adapter.controlled_prediction(base, x_t, t, batch["text_emb"], state, 1.0, None)
    loss = fp.loss(pred, fp.target(x0, noise, t), t)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def training_bytes(n_params: int) -> int:
    """fp32 weights + fp32 gradients + AdamW's two fp32 moments."""
    return 16 * n_params


def child(family: str, a) -> dict:
    mem = C.PeakMemory(a.device)
    base, batch = setup(family, a)
    out = {"base_params": base.num_parameters(), "denoiser_params": sum(p.numel() for p in base.unet.parameters())}
    out["peak_base_inference"] = mem.measure(lambda: base_forward(base, batch), repeat=1)
    module, opt = mcm_module(base)
    out["mcm_params"] = C.numel(module.mcm)
    out["peak_mcm_step"] = mem.measure(lambda: C.mcm_step(module, opt, batch))
    fns = {"base_forward": lambda: base_forward(base, batch), "mcm_step": lambda: C.mcm_step(module, opt, batch)}
    order = ["base_forward", "mcm_step", "base_forward", "mcm_step"]
    cn = None
    n_cn = controlnet_params(base)
    if n_cn is not None:  # the family's ControlNet baseline (a UNet's ControlNetModel, a transformer's own class)
        out["controlnet_params"] = n_cn
        out["controlnet_training_bytes_needed"] = training_bytes(n_cn) + out["peak_base_inference"]
        total = (torch.cuda.get_device_properties(a.device).total_memory if a.device.startswith("cuda")
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if out["controlnet_training_bytes_needed"] < 0.8 * total:
            adapter, cn_opt = controlnet_parts(base)
            cn = (adapter, cn_opt)
            out["peak_controlnet_step"] = mem.measure(lambda: controlnet_step(base, adapter, cn_opt, batch), repeat=1)
            fns["controlnet_step"] = lambda: controlnet_step(base, adapter, cn_opt, batch)
            order = ["base_forward", "mcm_step", "controlnet_step", "base_forward", "mcm_step"]
        else:
            out["controlnet_skipped"] = (f"needs ~{out['controlnet_training_bytes_needed'] / 2**30:.1f} GiB (16 bytes x "
                                         f"{n_cn / 1e9:.2f}B trainable parameters + the base), this machine has "
                                         f"{total / 2**30:.1f} GiB")
    mem.release()
    out["times"] = C.interleaved(fns, a.reps, 1, a.device, order=order)
    t = {k: v["median_s"] for k, v in out["times"].items()}
    out["mcm_step_over_base_forward"] = t["mcm_step"] / t["base_forward"]
    out["mcm_peak_mem_over_base_inference"] = out["peak_mcm_step"] / out["peak_base_inference"]
    out["mcm_params_over_base"] = out["mcm_params"] / out["denoiser_params"]
    if cn is not None:
        out["controlnet_step_over_mcm_step"] = t["controlnet_step"] / t["mcm_step"]
    out["shapes"] = {"latent": [base.latent_channels, a.latent, a.latent], "batch": 1}
    out["device"] = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="sdxl,sd3")
    p.add_argument("--latent", type=int, default=32, help="latent side (image = 8x); small so the steps fit a CPU")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny widths: checks that the script runs (tests)")
    p.add_argument("--flux-blocks", default="4,8", help="FLUX.1's double- and single-stream blocks (full: 19,38)")
    p.add_argument("--qwen-layers", default="8", help="Qwen-Image's transformer blocks (full: 60)")
    p.add_argument("--base-free", action="store_true",
                   help="also the MCM step from cached predictions with the denoiser never loaded (a fresh process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-base-free", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child or a.child_base_free:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(TAG + json.dumps(child(a.child, a) if a.child else base_free_child(a.child_base_free, a)))
        return {}
    results = {}
    for fam in a.models.split(","):
        common = ["--latent", str(a.latent), "--reps", str(a.reps), "--device", a.device, "--flux-blocks",
                  a.flux_blocks, "--qwen-layers", a.qwen_layers] + (["--tiny"] if a.tiny else [])
        results[fam] = run_child(["--child", fam] + common, fam)
        r = results[fam]
        print(f"{fam}: base {r['denoiser_params'] / 1e9:.2f}B, MCM {r['mcm_params'] / 1e6:.2f}M "
              f"({100 * r['mcm_params_over_base']:.2f}%); MCM step / base forward {r['mcm_step_over_base_forward']:.3f}; "
              f"MCM peak / base inference peak {r['mcm_peak_mem_over_base_inference']:.3f}; "
              + (f"ControlNet step / MCM step {r['controlnet_step_over_mcm_step']:.2f}"
                 if "controlnet_step_over_mcm_step" in r
                 else r.get("controlnet_skipped", "ControlNet step not measured for this family")))
        if a.base_free:
            free = run_child(["--child-base-free", fam] + common, f"{fam} (base-free)")
            r["base_free"] = free
            t_free, t_base = free["times"]["base_free_step"]["median_s"], r["times"]["base_forward"]["median_s"]
            r["base_free_step_over_base_forward"] = t_free / t_base
            r["base_free_peak_over_base_inference"] = free["peak_base_free_step"] / r["peak_base_inference"]
            print(f"{fam} base-free: step {t_free:.3f} s ({r['base_free_step_over_base_forward']:.3f} base forwards), "
                  f"peak {free['peak_base_free_step'] / 2**30:.2f} GiB "
                  f"({r['base_free_peak_over_base_inference']:.3f} x the base's inference peak)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


def run_child(args: list[str], what: str) -> dict:
    """One measurement in a fresh process (its peak memory is its own)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith(TAG)]
    if out.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(TAG):])


if __name__ == "__main__":
    main()
