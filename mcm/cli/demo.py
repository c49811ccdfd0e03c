"""``mcm demo``: sample a grid from the shipped shapes32 MCM in seconds, offline.

Held-out conditions come from the shapes generator's ``test`` split (never used in training);
the grid shows, per column: segmentation | sketch | depth | partial mask | base alone |
base + MCM (all four controls), same seed; tiles blown up (nearest) to 128 px, each row labelled.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def shapes_conditions(n: int, seed: int = 1234, size: int = 32) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Held-out shapes conditions (``test`` split) for all four built-in modalities, and their captions."""
    import modalities
    from datamodules.shapes import make_sample

    samples = [make_sample(seed, i, size, split="test") for i in range(n)]
    seg = torch.stack([torch.from_numpy(s.seg.astype("int64")) for s in samples])
    depth = torch.stack([torch.from_numpy(s.depth.astype("float32") / 65535.0)[None] for s in samples])
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    sketch_plugin = modalities.get("sketch")
    sketch = torch.stack([sketch_plugin.derive(img, {}) for img in images])
    partial = modalities.get("partial_mask", num_classes=6)
    part = torch.stack([partial.eval_transform(l, f"demo{i}") for i, l in enumerate(seg)])
    conds = {"segmentation": seg, "sketch": sketch, "depth": depth, "partial_mask": part}
    return conds, [s.caption for s in samples]


def run_demo(out: str | Path = "outputs/demo.png", n: int = 8, steps: int = 25, seed: int = 0,
             model: str = "shapes32", guidance_scale: float | None = None, only: list[str] | None = None,
             strength=None, window: tuple[float, float] = (0.0, 1.0)) -> Path:
    """Grid of held-out conditions | base | base + MCM; ``only`` restricts the conditions to a subset.

    ``strength``: a float, map, schedule or ``(map, schedule)`` as ``MCMPipeline`` takes it; ``window``: the
    noise fractions where the module acts."""
    from mcm import MCMPipeline
    from mcm.pipelines.pipeline import window_arguments

    pipe = MCMPipeline.from_pretrained(model)
    module = pipe.modules[0]
    size = pipe.base.sample_size[0] * pipe.base.downsample  # the base's own size: "base alone" samples there
    conds, captions = shapes_conditions(n, size=size)
    conds = {k: v for k, v in conds.items() if k in module.modality_names and (not only or k in only)}
    if not conds:
        raise ValueError(f"--modalities {only}: the module knows {module.modality_names}")
    seeds = [seed + i for i in range(n)]
    prompts = captions if pipe.base.is_text_conditional else None
    mcm = pipe(conditions=conds, prompt=prompts, num_inference_steps=steps, seeds=seeds, guidance_scale=guidance_scale,
               conditioning_scale=strength, **window_arguments(window), output_type="pt").images
    base = pipe(conditions={}, num_images=n, prompt=prompts, num_inference_steps=steps, seeds=seeds,
                guidance_scale=guidance_scale, output_type="pt").images  # the base alone, same seeds
    from mcm.pipelines.grids import comparison_labels, labelled_grid

    rows = [module.plugins[k].visualize(v) for k, v in conds.items()] + [base, mcm]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    label_s = strength if strength is None or isinstance(strength, (int, float)) else "map/schedule"
    labels = comparison_labels(module, list(conds), label_s)
    labels[-2:] = [f"{t}, seeds {seeds[0]}-{seeds[-1]}" for t in labels[-2:]]  # one seed per column, both rows
    labelled_grid(torch.cat(rows), n, labels).save(out)
    log.info("demo grid (rows: %s, base, base+MCM) -> %s", ", ".join(conds), out)
    return out


def _run(a: argparse.Namespace) -> int:
    from mcm.evaluation.strength_args import strength_from_args

    run_demo(a.out, a.n, a.steps, a.seed, a.model, a.guidance_scale, a.modalities, strength_from_args(a), a.window)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("demo", help="sample a grid from the shipped shapes32 MCM (offline, seconds)")
    p.add_argument("--out", default="outputs/demo.png")
    p.add_argument("--n", type=int, default=8, help="number of held-out layouts (columns)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the base family pipeline's own)")
    p.add_argument("--modules", "--model", dest="model", default="shapes32",
                   help="'shapes32' or an exported MCM directory (--model is the earlier name)")
    p.add_argument("--modalities", nargs="*", default=None, help="condition on this subset only (default: all)")
    p.add_argument("--conditioning-scale", "--strength", dest="strength", type=float, default=None,
                   help="modulation strength (default: the module's recorded default_strength)")
    from mcm.evaluation.strength_args import add_strength_args

    add_strength_args(p)
    p.set_defaults(func=_run)
