"""Measure an exported base on ``shapes`` and write its model card (issue: the frozen base, item 4).

    python -m mcm.evaluation.base_card --base runs/base_shapes32/export --out mcm/weights/shapes32/base \
        --train-log runs/base_shapes32/train_summary.json

Measures, side by side with real held-out ``shapes`` images:
* saturated-pixel fraction: the share of samples whose fraction of saturated pixels (HSV
  saturation >= 0.5, value >= 0.35) falls inside the range holding 99% of real images;
* named colours: for caption-conditioned samples, how often each colour the caption names
  appears (>= 6 saturated pixels within 20 degrees of its hue: recall), and the share of
  saturated pixels that have a named colour (precision: noise has every hue);
* named shapes: the same with the shipped segmentation judge's labels and the shape
  classes the caption names.
Writes ``samples_unconditional.png`` and ``samples_captioned.png`` (64 each) and ``README.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from datamodules.shapes import CLASS_NAMES, COLOURS, make_sample

from mcm.diffusion.control import sample_base
from mcm.models.frozen_base import FrozenBase

log = logging.getLogger(__name__)
EVAL_SEED = 4321  # held-out: the generator's "test" split with a seed no training run uses


def hsv(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B,3,H,W)`` in [0,1] -> hue in degrees, saturation, value, each ``(B,H,W)``."""
    x = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-8), 0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    dd = np.maximum(d, 1e-8)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) * 60
    return h, s, mx


def saturated_fraction(images: torch.Tensor) -> np.ndarray:
    _, s, v = hsv(images)
    return ((s >= 0.5) & (v >= 0.35)).mean(axis=(1, 2))


def named_colours(caption: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", caption.lower()) if w in COLOURS]


def named_shapes(caption: str) -> list[int]:
    words = re.findall(r"[a-z]+", caption.lower())
    return [CLASS_NAMES.index(w) for w in words if w in CLASS_NAMES[1:]]


def colour_hits(images: torch.Tensor, captions: list[str], min_pixels: int = 6) -> tuple[float, float]:
    """(recall, precision): named colours that appear; saturated pixels whose hue is a named colour.

    Precision matters because noise contains every hue: recall alone would call it perfect.
    """
    h, s, v = hsv(images)
    hit = total = 0
    in_named = saturated = 0
    for i, cap in enumerate(captions):
        sat = (s[i] >= 0.5) & (v[i] >= 0.35)
        named = np.zeros_like(sat)
        for c in named_colours(cap):
            close = (np.abs((h[i] - COLOURS[c] + 180) % 360 - 180) <= 20) & sat
            hit += int(close.sum() >= min_pixels)
            total += 1
            named |= close
        in_named += int(named.sum())
        saturated += int(sat.sum())
    return hit / max(total, 1), in_named / max(saturated, 1)


def shape_hits(images: torch.Tensor, captions: list[str], min_pixels: int = 6) -> tuple[float, float] | None:
    """(recall, precision) of named shape classes in the judge's segmentation of the images."""
    try:
        from mcm.evaluation.judges import load_judge

        judge = load_judge("shapes32-segmentation")
    except Exception as e:  # the judge is optional here
        log.warning("no segmentation judge (%s): skipping the named-shape measure", e)
        return None
    labels = judge.predict(images)
    hit = total = in_named = foreground = 0
    for i, cap in enumerate(captions):
        ks = named_shapes(cap)
        for k in ks:
            hit += int((labels[i] == k).sum().item() >= min_pixels)
            total += 1
        in_named += int(torch.isin(labels[i], torch.tensor(ks or [-1])).sum())
        foreground += int((labels[i] > 0).sum())
    return hit / max(total, 1), in_named / max(foreground, 1)


def real_images(n: int, split: str = "test", seed: int = EVAL_SEED) -> tuple[torch.Tensor, list[str]]:
    samples = [make_sample(seed, i, 32, split) for i in range(n)]
    imgs = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    return imgs, [s.caption for s in samples]


def measure(base: FrozenBase, n: int = 256, steps: int = 50, guidance_scale: float = 3.0, batch: int = 64) -> dict:
    """Quality numbers for base samples and real images, same measures."""
    real, captions = real_images(max(n, 2000))
    lo, hi = np.quantile(saturated_fraction(real), [0.005, 0.995])
    caps = captions[:n]
    uncond = torch.cat([sample_base(base, [""] * min(batch, n - i), steps, guidance_scale, seed=1000 + i)
                        for i in range(0, n, batch)])
    cond = torch.cat([sample_base(base, caps[i:i + batch], steps, guidance_scale, seed=2000 + i)
                      for i in range(0, n, batch)])

    def in_range(x: torch.Tensor) -> float:
        f = saturated_fraction(x)
        return float(((f >= lo) & (f <= hi)).mean())

    out = {"n": n, "steps": steps, "guidance_scale": guidance_scale, "saturated_range": [float(lo), float(hi)],
           "in_range": {"real": in_range(real[:n]), "base_unconditional": in_range(uncond),
                        "base_captioned": in_range(cond)}}
    ch_real, ch_gen = colour_hits(real[:n], caps), colour_hits(cond, caps)
    out["named_colour_recall"] = {"real": ch_real[0], "base_captioned": ch_gen[0]}
    out["named_colour_precision"] = {"real": ch_real[1], "base_captioned": ch_gen[1]}
    sh_real, sh_gen = shape_hits(real[:n], caps), shape_hits(cond, caps)
    if sh_real and sh_gen:
        out["named_shape_recall"] = {"real": sh_real[0], "base_captioned": sh_gen[0]}
        out["named_shape_precision"] = {"real": sh_real[1], "base_captioned": sh_gen[1]}
    return out, uncond, cond


def write_card(out: Path, base: FrozenBase, metrics: dict, train: dict) -> Path:
    m = metrics
    rows = [("saturated-pixel fraction inside the real 99% range "
             f"[{m['saturated_range'][0]:.3f}, {m['saturated_range'][1]:.3f}]",
             m["in_range"]["real"], f"{m['in_range']['base_unconditional']:.3f} (unconditional), "
             f"{m['in_range']['base_captioned']:.3f} (captioned)"),
            ("named colours present (recall, captioned)", m["named_colour_recall"]["real"],
             f"{m['named_colour_recall']['base_captioned']:.3f}"),
            ("saturated pixels in a named colour (precision, captioned)", m["named_colour_precision"]["real"],
             f"{m['named_colour_precision']['base_captioned']:.3f}")]
    if "named_shape_recall" in m:
        rows.append(("named shapes found by the segmentation judge (recall)", m["named_shape_recall"]["real"],
                     f"{m['named_shape_recall']['base_captioned']:.3f}"))
        rows.append(("judge foreground pixels of a named shape (precision)", m["named_shape_precision"]["real"],
                     f"{m['named_shape_precision']['base_captioned']:.3f}"))
    table = "\n".join(f"| {a} | {b:.3f} | {c} |" for a, b, c in rows)
    n_unet = sum(p.numel() for p in base.unet.parameters())
    n_text = sum(p.numel() for p in base.text_encoder.parameters())
    text = f"""# shapes32 — the embedded base

A pixel-space (32x32), text-conditional diffusers `UNet2DConditionModel` with a small
`CLIPTextModel` and a word-level tokenizer over the `shapes` caption vocabulary, pretrained
by this project on the generated `shapes` dataset. It never saw segmentation, sketch or
depth: those are what MCM adds. EMA weights, safetensors. Loaded offline with
`FrozenBase.from_pretrained("shapes32")` / `MCMPipeline.from_pretrained("shapes32")`.

- UNet: {n_unet / 1e6:.2f}M parameters, block_out_channels {list(base.unet.config.block_out_channels)},
  layers_per_block {base.unet.config.layers_per_block}, cross-attention only at 8x8; text encoder {n_text / 1e6:.2f}M.
- Scheduler: {type(base.scheduler).__name__}, {base.scheduler.config.beta_schedule}, prediction_type
  `{base.prediction_type}`; trained with min-SNR-5 loss weighting, lr 1e-3 after 500 warm-up steps, EMA (diffusers
  `EMAModel`, decay 0.999 with warm-up), 10% caption dropout (for classifier-free guidance).

## How it was made

```bash
mcm data shapes --out data/shapes50k --train 50000 --val 1000 --seed 0
mcm fit -c experiments/shapes32/pretrain_base.yaml          # resumable: re-run the same command
python -m mcm.evaluation.base_card --base mcm/weights/shapes32/base --out mcm/weights/shapes32/base \\
    --train-log runs/base_shapes32/train_summary.json --n {m['n']} --steps {m['steps']}
```

| | |
| --- | --- |
| data | {train.get('data', '50,000 generated shapes images (seed 0), 32x32')} |
| steps | {train.get('steps', '?')} (batch {train.get('batch_size', 32)}) |
| seed | {train.get('seed', 0)} |
| final training loss (min-SNR weighted, mean of last 200 steps) | {train.get('final_loss', '?')} |
| wall time | {train.get('wall_time', '?')} on 2 CPU cores |

## Quality (measured, {m['n']} samples each, DDIM {m['steps']} steps, guidance {m['guidance_scale']})

| measure | real held-out `shapes` | base samples |
| --- | --- | --- |
{table}

Real images are the generator's held-out `test` split (seed {EVAL_SEED}); captioned samples use
those images' captions. `samples_unconditional.png` and `samples_captioned.png` hold 64
samples each (the first 64 of the captions above, in order).
"""
    path = out / "README.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="exported base directory (or 'shapes32')")
    p.add_argument("--out", required=True, help="the shipped base directory to write the card and grids into")
    p.add_argument("--train-log", default=None, help="JSON with steps, final_loss, wall_time, ... of the run")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    t = time.time()
    base = FrozenBase.from_pretrained(a.base)
    metrics, uncond, cond = measure(base, a.n, a.steps, a.guidance_scale)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image(uncond[:64], out / "samples_unconditional.png", nrow=8, padding=1, pad_value=1.0)
    save_image(cond[:64], out / "samples_captioned.png", nrow=8, padding=1, pad_value=1.0)
    (out / "quality.json").write_text(json.dumps(metrics, indent=2))
    train = json.loads(Path(a.train_log).read_text()) if a.train_log else {}
    write_card(out, base, metrics, train)
    log.info("model card written to %s (%.0f s): %s", out, time.time() - t, json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
