"""Does a trained module use its maps?  Its denoising loss by noise level, with each sample's own maps, with
another sample's maps, and for the base alone.

    python -m mcm.evaluation.condition_use --mcm runs/x/export --data "data/shapes/val-*.tar" --n 100

A module that follows its maps has a lower loss with the right maps than with a wrong one, most of all at the
noise levels where the layout is decided; one that learned only a map-independent correction (or nothing) has
the same loss with either.  Unlike sampling and judging, this needs no judge and reads the noise levels one by
one: ``docs/ablations.md`` used it to show that sketch-only MCMs learned nothing from their sketches in 600 steps.

Per band of training timesteps, the same ``x_t`` (seeded) for all three; the loss is the plain MSE against the
base's target (no min-SNR weighting), at strength 1, with every map of ``--modalities`` present.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch


def band_losses(base, module, data: dict, names: Sequence[str], bands: Sequence[tuple[int, int]], seed: int = 0,
                batch_size: int = 50) -> list[dict]:
    """``[{"band", "own", "other", "base"}]``: mean MSE per timestep band with the samples' own maps, with the
    maps rolled by one sample in the batch (another sample's), and of the base alone."""
    from mcm.diffusion.forward_process import forward_process_for

    if base.is_class_conditional:
        raise ValueError(f"condition_use: the base '{base.source}' is class-conditional (DiT); this measure conditions "
                         f"on captions or nothing, not on class labels")
    fp = forward_process_for(base.scheduler)
    images = data["image"] * 2 - 1  # [0, 1] -> [-1, 1]
    N, gen = images.shape[0], torch.Generator().manual_seed(seed)
    if N < 2:
        raise ValueError("condition_use: need at least 2 samples (the wrong maps are another sample's)")
    # batches of >= 2 samples (the wrong maps are another sample's), each encoded once for every band
    starts = [i for i in range(0, N, batch_size) if min(batch_size, N - i) >= 2]
    caps = data.get("caption")
    encoded = []
    with torch.no_grad():
        for i in starts:
            x = images[i:i + batch_size].to(base.device)
            B = x.shape[0]
            prompts = list(caps[i:i + B]) if base.is_text_conditional and caps else None
            encoded.append((i, base.encode_images(x), base.encode_context(prompts, batch_size=B,
                                                                          image_size=tuple(x.shape[-2:]))))
    used = sum(x0.shape[0] for _, x0, _ in encoded)
    rows = []
    for lo, hi in bands:
        sums = {"own": 0.0, "other": 0.0, "base": 0.0}
        for i, x0, context in encoded:
            B = x0.shape[0]
            t = torch.randint(lo, hi, (B,), generator=gen).to(x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            x_t, target = fp.add_noise(x0, noise, t), fp.target(x0, noise, t)
            with torch.no_grad():
                p = base.predict(x_t, t, context)
                sums["base"] += float(((p - target) ** 2).mean()) * B
                for which, roll in (("own", 0), ("other", 1)):
                    conds = {n: data[n][i:i + B].roll(roll, 0).to(x0.device) for n in names}
                    state = module.encode_conditions(conds, None, tuple(x_t.shape[-2:]), B)
                    pred = module.controlled_prediction(base, x_t, t, context, state, 1.0, lambda: p)
                    sums[which] += float(((pred - target) ** 2).mean()) * B
        rows.append({"band": [lo, hi], **{k: v / used for k, v in sums.items()}})
    return rows


def gain(row: dict) -> float:
    """How much lower a band's loss is with the samples' own maps than with another sample's (0.1 = 10%)."""
    return 1 - row["own"] / row["other"] if row["other"] else 0.0


def table(rows: list[dict]) -> str:
    lines = ["| timesteps | own maps | another sample's maps | base alone | own vs another |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['band'][0]}-{r['band'][1]} | {r['own']:.4f} | {r['other']:.4f} | {r['base']:.4f} | "
                     f"{100 * gain(r):+.1f}% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from mcm.evaluation import evaluate as E

    p = argparse.ArgumentParser(prog="python -m mcm.evaluation.condition_use", description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", "--mcm", dest="mcm", required=True, help="exported module directory (or a built-in module name)")
    p.add_argument("--base", default=None, help="base (default: the one the module names)")
    p.add_argument("--data", required=True, help="held-out shards")
    p.add_argument("--n", type=int, default=100, help="samples (default 100)")
    p.add_argument("--modalities", nargs="*", default=None, help="maps given (default: all the module knows)")
    p.add_argument("--bands", type=int, default=5, help="equal timestep bands (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    pipe = E.build_pipeline([a.mcm], a.base, None, "cpu")
    module = pipe.modules[0]
    names = a.modalities or list(module.modality_names)
    unknown = sorted(set(names) - set(module.modality_names))
    if unknown:
        raise SystemExit(f"--modalities: {unknown} not among the module's {module.modality_names}")
    specs = {n: module.plugins[n].config() for n in names}
    size = pipe.base.sample_size[0] * pipe.base.downsample
    data = E.load_data(a.data, specs, size, a.n)
    T = pipe.base.num_train_timesteps
    edges = [round(T * k / a.bands) for k in range(a.bands + 1)]
    rows = band_losses(pipe.base, module, data, names, list(zip(edges[:-1], edges[1:])), a.seed)
    print(f"{a.mcm}, maps {names}, {data['image'].shape[0]} samples of {a.data}:")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"mcm": a.mcm, "modalities": names, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
