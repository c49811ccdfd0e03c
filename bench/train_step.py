"""Training cost of MCM against its alternatives, as ratios to one no-grad forward of the base.

For each bench model (``shapes32``, ``sd15``; see ``bench/common.py``):

- A: one no-grad base forward (``FrozenBase.predict``);
- B: one MCM training step: ``MCMModule``'s own step (base forward under no_grad, MCM forward),
  backward, AdamW;
- C: one ControlNet training step (diffusers ``ControlNetModel.from_unet``; residuals into the
  frozen UNet; backward through the frozen decoder), AdamW;
- D: one full fine-tuning step of the base UNet, AdamW (mixed precision when ``--base-dtype``
  is not fp32).

B is measured twice more against each other, as the full step a data pipeline gives: *from raw
images* (the batch has only images and captions: the VAE encoder and the text encoder run in the
step), *from cached latents* (``batch["latent"]`` / ``batch["text_emb"]`` as ``mcm data encode``
shards give them: neither runs) and *from cached predictions* (``mcm data encode --predictions 1``:
``x_t``, ``t``, the target and the base's ``p`` are read, so not even the base runs: the MCM's own cost);
all in units of A.

A, B, C run interleaved (A B C A B C ...) in this process and report medians.  D needs the
base's weights, gradients and AdamW state (4x the UNet: 14 GB for SD) and does not fit next to
the ControlNet in RAM here, so a fresh child process times it interleaved with its own base
forwards (A D A D ...) and, before that, measures the peak memory of A, B, C and D one after
another (peak RSS on CPU, ``max_memory_allocated`` on CUDA).

    python bench/train_step.py --quick --json bench_train.json
    python bench/train_step.py --quick --base-dtype bfloat16 --channels-last
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from mcm.training.adapter_module import adamw  # noqa: E402  (fused AdamW for every method alike)

CHILD_TAG = "BENCH_CHILD_RESULT "
TARGETS = {  # issue 7, SD-architecture row
    "mcm_step_over_base_forward": ("<=", 1.15), "controlnet_step_over_mcm_step": (">=", 2.2),
    "mcm_peak_mem_over_base_inference": ("<=", 1.3)}


def setup(name: str, args):
    """Model, cached batch, MCM module + optimizer, ControlNet + optimizer, and the step closures."""
    m = C.build_model(name, args)
    batch = C.make_batch(m, C.batch_size_of(name, args), args.device)
    return m, batch


def build_mcm(m, args):
    module = C.build_mcm_module(m)
    if args.channels_last:
        module.mcm.to(memory_format=torch.channels_last)
    C.maybe_compile(module.mcm.unet, args)
    opt = module.configure_optimizers()["optimizer"]
    return module, opt


def build_cn(m, batch, args):
    cond = C.control_image(m, batch)
    cn = C.build_controlnet(m, cond.shape[1])
    if args.channels_last:
        cn.to(memory_format=torch.channels_last)
    C.maybe_compile(cn, args)
    opt = adamw(cn.parameters(), lr=1e-5)
    return cn, opt, cond


def measure_in_process(name: str, args) -> dict:
    """A, B, C (+ the data-side VAE and text encodes) interleaved; parameter counts."""
    m, batch = setup(name, args)
    C.maybe_compile(m.base.unet, args)
    module, mcm_opt = build_mcm(m, args)
    cn, cn_opt, cond = build_cn(m, batch, args)
    fns = {
        "base_forward": lambda: C.base_forward(m, batch),
        "mcm_step": lambda: C.mcm_step(module, mcm_opt, batch),
        "controlnet_step": lambda: C.trainable_step(lambda: C.unet_loss(m, m.base.unet, batch, cn, cond), cn_opt),
    }
    reps, warmup = C.reps_of(args)
    # A B C A B: the two cheap entries whose ratio is the headline get twice the samples
    times = C.interleaved(fns, reps, warmup, args.device,
                          order=["base_forward", "mcm_step", "controlnet_step", "base_forward", "mcm_step"])
    encodes = {"vae_encode": lambda: m.base.encode_images(batch["image"]),  # data-side, same for every method
               "text_encode": lambda: m.base.encode_text(batch["caption"])}
    times.update(C.interleaved(encodes, 2, 1, args.device))
    # the MCM step from raw images (VAE + text encoder inside) against the step from cached latents
    raw_batch = {k: v for k, v in batch.items() if k not in ("latent", "text_emb")}
    pred_batch = C.cached_prediction_batch(m, batch, 1)
    steps = {"mcm_step_from_raw": lambda: C.mcm_step(module, mcm_opt, raw_batch),
             "mcm_step_from_cached": lambda: C.mcm_step(module, mcm_opt, batch),
             "mcm_step_from_cached_predictions": lambda: C.mcm_step(module, mcm_opt, pred_batch)}
    times.update(C.interleaved(steps, max(2, reps // 2), 1 if warmup else 0, args.device))
    unet_params = sum(p.numel() for p in m.base.unet.parameters())
    params = {"mcm": C.numel(module.mcm), "controlnet": C.numel(cn), "base_unet": unet_params,
              "base_all": m.base.num_parameters()}
    return {"base_source": m.source, "times": times, "params": params,
            "shapes": {"batch": batch["latent"].shape[0], "image": list(batch["image"].shape[-2:]),
                       "model_space": list(batch["latent"].shape[1:])}}


def child(name: str, args) -> dict:
    """Fresh process: peak memory of A, B, C, D one after another, then D timed against A."""
    mem = C.PeakMemory(args.device)
    m, batch = setup(name, args)
    peaks = {"weights_loaded": mem.current()}
    peaks["base_inference"] = mem.measure(lambda: C.base_forward(m, batch), repeat=1)  # no state to build up
    module, opt = build_mcm(m, args)
    peaks["mcm_step"] = mem.measure(lambda: C.mcm_step(module, opt, batch))  # 2nd step: with AdamW state
    del module, opt
    cn, opt, cond = build_cn(m, batch, args)
    peaks["controlnet_step"] = mem.measure(
        lambda: C.trainable_step(lambda: C.unet_loss(m, m.base.unet, batch, cn, cond), opt))
    del cn, opt, cond
    unet = m.base.unet if m.base.unet.dtype == torch.float32 else copy.deepcopy(m.base.unet).float()
    unet.requires_grad_(True)  # the base UNet itself (fp32) or an fp32 master copy (mixed precision)
    C.maybe_compile(unet, args)
    opt = adamw(unet.parameters(), lr=1e-5)
    ft = lambda: C.trainable_step(lambda: C.unet_loss(m, unet, batch), opt)  # noqa: E731
    peaks["finetune_step"] = mem.measure(ft)
    mem.release()
    reps, _ = C.reps_of(args)
    reps = min(reps, 2) if args.quick else reps
    times = C.interleaved({"base_forward": lambda: C.base_forward(m, batch), "finetune_step": ft}, reps,
                          0 if args.quick else 1,
                          args.device)
    return {"peak_mem_bytes": peaks, "times": times, "memory_kind": "cuda max_memory_allocated" if mem.cuda
            else "peak RSS above the interpreter + libraries"}


def run_child(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(CHILD_TAG):])


def summarize(main: dict, kid: dict, batch: int) -> dict:
    t = {k: v["median_s"] for k, v in main["times"].items()}
    t["finetune_step"] = kid["times"]["finetune_step"]["median_s"]
    t["base_forward_child"] = kid["times"]["base_forward"]["median_s"]
    t_min = {k: v["min_s"] for k, v in main["times"].items()}
    t_min.update(finetune_step=kid["times"]["finetune_step"]["min_s"],
                 base_forward_child=kid["times"]["base_forward"]["min_s"])
    mem, p = kid["peak_mem_bytes"], main["params"]
    return {
        "base_source": main["base_source"], "shapes": main["shapes"], "time_s": t, "time_min_s": t_min,
        "peak_mem_bytes": mem,
        "memory_kind": kid["memory_kind"], "params": p, "timing_reps": {k: v["reps"] for k, v in main["times"].items()},
        "mcm_step_over_base_forward": t["mcm_step"] / t["base_forward"],
        "controlnet_step_over_mcm_step": t["controlnet_step"] / t["mcm_step"],
        "controlnet_step_over_base_forward": t["controlnet_step"] / t["base_forward"],
        # D was timed in the child against the child's own base forwards
        "finetune_step_over_base_forward": t["finetune_step"] / t["base_forward_child"],
        "data_encode_over_base_forward": (t["vae_encode"] + t["text_encode"]) / t["base_forward"],
        "mcm_step_from_raw_over_base_forward": t["mcm_step_from_raw"] / t["base_forward"],
        "mcm_step_from_cached_over_base_forward": t["mcm_step_from_cached"] / t["base_forward"],
        "mcm_step_from_cached_predictions_over_base_forward":
            t["mcm_step_from_cached_predictions"] / t["base_forward"],
        "mcm_peak_mem_over_base_inference": mem["mcm_step"] / mem["base_inference"],
        "controlnet_peak_mem_over_base_inference": mem["controlnet_step"] / mem["base_inference"],
        "finetune_peak_mem_over_base_inference": mem["finetune_step"] / mem["base_inference"],
        "mcm_params_over_base": p["mcm"] / p["base_unet"],
        "mcm_params_over_base_all": p["mcm"] / p["base_all"],
        # fp32 gradients DDP all-reduces per step: only the trainable parameters
        "allreduce_bytes_mcm": 4 * p["mcm"], "allreduce_bytes_controlnet": 4 * p["controlnet"],
        "allreduce_bytes_finetune": 4 * p["base_unet"],
        "samples_per_s_mcm": batch / t["mcm_step"],
    }


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return f"{v / 2**20:.1f} MiB" if isinstance(v, int) and v > 2**20 else str(v)


def print_table(results: dict) -> None:
    names = list(results)
    rows = ["mcm_step_over_base_forward", "controlnet_step_over_mcm_step", "controlnet_step_over_base_forward",
            "finetune_step_over_base_forward", "data_encode_over_base_forward",
            "mcm_step_from_raw_over_base_forward", "mcm_step_from_cached_over_base_forward",
            "mcm_step_from_cached_predictions_over_base_forward", "mcm_peak_mem_over_base_inference",
            "controlnet_peak_mem_over_base_inference", "finetune_peak_mem_over_base_inference",
            "mcm_params_over_base", "allreduce_bytes_mcm", "allreduce_bytes_controlnet", "samples_per_s_mcm"]
    print(f"{'':42s}" + "".join(f"{n:>21s}" for n in names))
    for k in ("base_forward", "mcm_step", "controlnet_step", "finetune_step", "vae_encode", "text_encode",
              "mcm_step_from_raw", "mcm_step_from_cached", "mcm_step_from_cached_predictions"):
        print(f"{'time ' + k + ' [s]':42s}" + "".join(f"{results[n]['time_s'][k]:21.4f}" for n in names))
    for k in ("base_inference", "mcm_step", "controlnet_step", "finetune_step"):
        print(f"{'peak mem ' + k + ' [MiB]':42s}" + "".join(
            f"{results[n]['peak_mem_bytes'][k] / 2**20:21.1f}" for n in names))
    for k in rows:
        cells = []
        for n in names:
            cell = fmt(results[n][k])
            if n == "sd15" and k in TARGETS:
                op, lim = TARGETS[k]
                ok = results[n][k] <= lim if op == "<=" else results[n][k] >= lim
                cell += f" ({'ok' if ok else 'MISS'} {op}{lim})"
            cells.append(f" {cell:>20s}")
        print(f"{k:42s}" + "".join(cells))
    for n in names:
        print(f"{n}: {results[n]['base_source']}; shapes {results[n]['shapes']}")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        print(CHILD_TAG + json.dumps(child(args.child, args)), flush=True)
        return {}
    child_argv = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    config = {k: getattr(args, k) for k in ("sd_latent", "sd_batch", "shapes_batch", "base_dtype", "channels_last",
                                            "compile", "device", "quick", "tiny")}
    config["threads"] = torch.get_num_threads()
    results = {}
    for name in args.models.split(","):
        kid = run_child(name, child_argv)  # first: the child needs the memory the main process frees
        main_res = measure_in_process(name, args)
        results[name] = {**summarize(main_res, kid, C.batch_size_of(name, args)), "config": config}
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
