"""How training cost grows with resolution and batch size: base forward, MCM step, ControlNet step.

Times the three in one process (interleaved, medians) on one bench model for several model-space
sides at batch 1 and several batch sizes at one side, then plots seconds and the ratios to the
base forward.

    python bench/scaling.py --model sd15 --sides 16,32,48,64 --batches 1,2,4 --plot docs/scaling_sd15.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench import common as C  # noqa: E402
from mcm.training.adapter_module import adamw  # noqa: E402  (fused AdamW for every method alike)


def point(m: C.BenchModel, module, mcm_opt, cn, cn_opt, side: int, batch_size: int, args) -> dict:
    m.image_size = side * m.base.downsample
    batch = C.make_batch(m, batch_size, args.device)
    cond = C.control_image(m, batch)
    fns = {"base_forward": lambda: C.base_forward(m, batch),
           "mcm_step": lambda: C.mcm_step(module, mcm_opt, batch),
           "controlnet_step": lambda: C.trainable_step(lambda: C.unet_loss(m, m.base.unet, batch, cn, cond), cn_opt)}
    reps, warmup = C.reps_of(args)
    t = {k: v["median_s"] for k, v in C.interleaved(fns, reps, warmup, args.device).items()}
    print(f"side {side:3d} batch {batch_size:2d}: " + "  ".join(f"{k} {v:.3f}s" for k, v in t.items()), flush=True)
    return {"side": side, "batch": batch_size, "time_s": t,
            "mcm_step_over_base_forward": t["mcm_step"] / t["base_forward"],
            "controlnet_step_over_base_forward": t["controlnet_step"] / t["base_forward"]}


def plot(res: dict, path: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (key, pts, xlabel) in enumerate((("side", res["by_side"], f"model-space side (batch {res['side_batch']})"),
                                              ("batch", res["by_batch"], f"batch size (side {res['batch_side']})"))):
        xs = [p[key] for p in pts]
        ax = axes[0, col]
        for k, style in (("base_forward", "o-"), ("mcm_step", "s-"), ("controlnet_step", "^-")):
            ax.plot(xs, [p["time_s"][k] for p in pts], style, label=k.replace("_", " "))
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="seconds per call", title=f"{res['model']}: time")
        ax = axes[1, col]
        ax.plot(xs, [p["mcm_step_over_base_forward"] for p in pts], "s-", label="MCM step / base forward")
        ax.plot(xs, [p["controlnet_step_over_base_forward"] for p in pts], "^-", label="ControlNet step / base forward")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", xlabel=xlabel, ylabel="ratio", ylim=(0, None), title=f"{res['model']}: ratios")
        for ax in axes[:, col]:
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.suptitle(command, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p)
    p.add_argument("--model", default="sd15", choices=["shapes32", "sd15"])
    p.add_argument("--sides", default="16,32,48,64", help="model-space sides at batch --side-batch")
    p.add_argument("--side-batch", type=int, default=1)
    p.add_argument("--batches", default="1,2,4", help="batch sizes at side --batch-side")
    p.add_argument("--batch-side", type=int, default=32)
    p.add_argument("--plot", default=None, help="write the plot here (PNG)")
    args = p.parse_args(argv)
    m = C.build_model(args.model, args)
    probe = C.make_batch(m, 1, args.device)
    module = C.build_mcm_module(m)
    mcm_opt = module.configure_optimizers()["optimizer"]
    cn = C.build_controlnet(m, C.control_image(m, probe).shape[1])
    cn_opt = adamw(cn.parameters(), lr=1e-5)
    sides, batches = [int(s) for s in args.sides.split(",")], [int(b) for b in args.batches.split(",")]
    res = {"model": args.model, "base_source": m.source, "side_batch": args.side_batch, "batch_side": args.batch_side,
           "by_side": [point(m, module, mcm_opt, cn, cn_opt, s, args.side_batch, args) for s in sides],
           "by_batch": [point(m, module, mcm_opt, cn, cn_opt, args.batch_side, b, args) for b in batches]}
    command = "python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["command"] = command
    if args.plot:
        plot(res, args.plot, command)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
