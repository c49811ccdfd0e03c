"""Per-step sampling cost of base + MCM, base + ControlNet and base + 2 composed MCMs vs the base alone.

One denoising step each, through our real code path: ``mcm.diffusion.sampling.guided`` (classifier-free
guidance: both branches in one batched base call) around ``mcm.diffusion.control.controlled_predictor``
(one batched MCM call per module; modality features encoded once per run, when the predictor
is made, not per step).  ControlNet: diffusers ``ControlNetModel`` residuals into the frozen UNet,
both guidance branches batched the same way.  Steps run interleaved; medians are reported, and
overheads as ``t / t_base - 1`` (0.03 = 3 % per step).

    python bench/sample.py --quick --json bench_sample.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import common as C  # noqa: E402
from mcm.diffusion.control import Control, controlled_predictor  # noqa: E402
from mcm.diffusion.strength import Strength  # noqa: E402
from mcm.models.modulator import MultimodalConditioningModule  # noqa: E402
from mcm.diffusion.sampling import guided  # noqa: E402

DEFAULT_GUIDANCE = {"shapes32": 3.0, "sd15": 7.5}


def build_module(m: C.BenchModel, modalities: dict, args, seed: int) -> MultimodalConditioningModule:
    torch.manual_seed(seed)
    module = MultimodalConditioningModule(latent_channels=m.base.latent_channels, modalities=modalities,
                                          downsample=m.base.downsample, **m.mcm_config)
    nn.init.normal_(module.unet.conv_out.weight, std=1e-3)  # as after training: not an exact no-op
    module = module.to(m.base.device).eval()
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    C.maybe_compile(module.unet, args)
    return module


def controlnet_denoiser(m: C.BenchModel, cn, cond: torch.Tensor, text, uncond, guidance_scale: float):
    """Like ``guided`` but the frozen UNet takes ControlNet residuals; both branches batched."""
    unet, dt = m.base.unet, m.base.unet.dtype
    use_cfg = guidance_scale > 1.0
    emb = torch.cat([uncond, text]) if use_cfg else text
    cond = torch.cat([cond, cond]) if use_cfg else cond

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: torch.Tensor, step: int | None = None) -> torch.Tensor:
        x = torch.cat([x, x]) if use_cfg else x
        with C.autocast_for(m):
            down, mid = cn(x, t, encoder_hidden_states=emb.float(), controlnet_cond=cond, return_dict=False)
            p = unet(x.to(dt), t, encoder_hidden_states=emb.to(dt),
                     down_block_additional_residuals=[r.to(dt) for r in down],
                     mid_block_additional_residual=mid.to(dt)).sample.float()
        if not use_cfg:
            return p
        p_u, p_c = p.chunk(2)
        return p_u + guidance_scale * (p_c - p_u)

    return denoise


def measure(name: str, args) -> dict:
    m = C.build_model(name, args)
    B = args.batch
    batch = C.make_batch(m, B, args.device)
    size = tuple(batch["latent"].shape[-2:])
    gs = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE[name]
    text, uncond = batch["text_emb"], m.base.encode_text([""] * B)
    C.maybe_compile(m.base.unet, args)
    seg = build_module(m, {"segmentation": {"num_classes": 6}}, args, seed=1)
    depth = build_module(m, {"depth": {}}, args, seed=2)
    cond = C.control_image(m, batch)
    cn = C.build_controlnet(m, cond.shape[1]).eval()
    if args.channels_last:
        cn.to(memory_format=torch.channels_last)
    C.maybe_compile(cn, args)
    with torch.no_grad():
        controls1 = [Control(seg, {"segmentation": batch["segmentation"]})]
        controls2 = controls1 + [Control(depth, {"depth": batch["depth"]})]
        left = torch.zeros(1, 1, *size, device=args.device)
        left[..., : size[1] // 2] = 1.0
        controls_map = [Control(seg, {"segmentation": batch["segmentation"]}, 1.0, Strength(map=left))]
        controls_regions = [Control(seg, {"segmentation": batch["segmentation"]}, 1.0, None, left),
                            Control(depth, {"depth": batch["depth"]}, 1.0, None, 1 - left)]
        denoisers = {
            "base": guided(controlled_predictor(m.base, [], size), text, uncond, gs),
            "mcm": guided(controlled_predictor(m.base, controls1, size), text, uncond, gs),
            "controlnet": controlnet_denoiser(m, cn, cond, text, uncond, gs),
            "compose2": guided(controlled_predictor(m.base, controls2, size), text, uncond, gs),
            # regional and scheduled control: a spatial strength map; two modules, each in its own region
            "mcm_map": guided(controlled_predictor(m.base, controls_map, size), text, uncond, gs),
            "compose2_regions": guided(controlled_predictor(m.base, controls_regions, size), text, uncond, gs),
            # once per sampling run, not per step: the conditions -> MCM features
            "encode_features": lambda x, t: controlled_predictor(m.base, controls1, size),
        }
        x = torch.randn(B, m.base.latent_channels, *size, generator=torch.Generator().manual_seed(0)).to(args.device)
        t = torch.tensor(m.base.num_train_timesteps // 2, device=args.device)
        reps, warmup = C.reps_of(args)
        times = C.interleaved({k: (lambda f=f: f(x, t)) for k, f in denoisers.items()}, reps, warmup, args.device)
    tm = {k: v["median_s"] for k, v in times.items()}
    params = {"mcm": C.numel(seg), "mcm_depth": C.numel(depth), "controlnet": C.numel(cn),
              "base_unet": sum(p.numel() for p in m.base.unet.parameters())}
    return {
        "base_source": m.source, "guidance_scale": gs, "batch": B, "model_space": list(batch["latent"].shape[1:]),
        "time_per_step_s": tm, "timing_reps": reps, "params": params,
        "mcm_sampling_overhead": tm["mcm"] / tm["base"] - 1,
        "controlnet_sampling_overhead": tm["controlnet"] / tm["base"] - 1,
        "compose2_sampling_overhead": tm["compose2"] / tm["base"] - 1,
        # the regional-control target: <= 5 % per step over plain MCM sampling / plain composition
        "strength_map_over_mcm": tm["mcm_map"] / tm["mcm"] - 1,
        "regions_over_compose2": tm["compose2_regions"] / tm["compose2"] - 1,
        "feature_encode_over_base_step": tm["encode_features"] / tm["base"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p)
    p.add_argument("--batch", type=int, default=1, help="images per sampling run (both models)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 3 for shapes32, 7.5 for sd15)")
    args = p.parse_args(argv)
    results = {name: measure(name, args) for name in args.models.split(",")}
    names = list(results)
    print(f"{'per denoising step':34s}" + "".join(f"{n:>14s}" for n in names))
    for k in ("base", "mcm", "controlnet", "compose2", "mcm_map", "compose2_regions", "encode_features"):
        print(f"{'time ' + k + ' [s]':34s}" + "".join(f"{results[n]['time_per_step_s'][k]:14.4f}" for n in names))
    for k in ("mcm_sampling_overhead", "controlnet_sampling_overhead", "compose2_sampling_overhead",
              "strength_map_over_mcm", "regions_over_compose2"):
        print(f"{k:34s}" + "".join(f"{100 * results[n][k]:13.1f}%" for n in names))
    for n in names:
        print(f"{n}: {results[n]['base_source']}; CFG {results[n]['guidance_scale']}, batch {results[n]['batch']}, "
              f"model space {results[n]['model_space']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
