"""``mcm sample``: sample a frozen base with one or several modules (MCMs or ControlNets) into a grid.

    mcm sample --modules runs/shapes32_compose_segmentation/export runs/shapes32_compose_sketch/export \\
        --weights 1 1 --data "data/shapes/val-*.tar" --n 8 --seeds 0 1 --out compose.png
    mcm sample --modules seg_export --cond segmentation=labels.png --prompt "a red circle" --out one.png
    mcm sample --modules sketch_export --derive sketch=photo.png --out from_photo.png

Several modules compose by MCDM (docs/concepts.md#composition): ``p_c = p_u + sum_i w_i (p_i - p_u)``, each
module with its own conditions.  Conditions come from held-out shards (``--data``: each
module gets the modalities it knows) or from files: ``--cond [I:]MODALITY=map.png`` reads a
map, ``--derive [I:]MODALITY=image.png`` derives it from an RGB image with the plugin's own
preprocessing; ``I`` restricts it to module ``I`` (0-based), otherwise every module that knows
the modality gets it.  Noise seeds follow ``mcm evaluate``: condition ``i`` under seed ``s``
starts from ``s * 100000 + i``.  Grid rows: the input maps (and the real images with
``--data``), then per seed the base alone and each module alone (``--compare``), then the
composed samples.

Regional and scheduled control: ``--regions a.png b.png`` (one greyscale mask per ``--modules``, white =
the module acts, ``-`` = everywhere), ``--strength-map map.png`` (greyscale, white = full strength),
``--strength-schedule 1,1,0.5,...`` (one value per step, noisiest first) and ``--window LOW HIGH``
(noise fractions t/T where the modules act, 1 = pure noise).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.devices import resolve_device

log = logging.getLogger(__name__)


# ---- 1. conditions ------------------------------------------------------------------------------------
def parse_cond(spec: str, flag: str) -> tuple[int | None, str, str]:
    """``[I:]MODALITY=PATH`` -> ``(I or None, modality, path)``."""
    if "=" not in spec:
        raise ValueError(f"{flag} {spec!r}: expected [MODULE_INDEX:]MODALITY=PATH, e.g. segmentation=labels.png")
    key, path = spec.split("=", 1)
    index = None
    if ":" in key:
        idx, key = key.split(":", 1)
        if not idx.isdigit():
            raise ValueError(f"{flag} {spec!r}: module index {idx!r} is not a non-negative integer")
        index = int(idx)
    return index, key, path


def _read_image(path: str, flag: str) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: '{path}' does not exist")
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im, dtype=np.int32).astype(np.uint16)
        return np.array(im.convert("RGB") if flag == "--derive" else im)


def conditions_from_files(modules: list, cond: list[str], derive: list[str]) -> list[dict[str, torch.Tensor]]:
    """One dict of batched raw maps (batch 1) per module, from ``--cond`` maps and ``--derive`` images."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in modules]
    for flag, specs in (("--cond", cond), ("--derive", derive)):
        for spec in specs:
            index, name, path = parse_cond(spec, flag)
            if index is not None and index >= len(modules):
                raise ValueError(f"{flag} {spec!r}: module index {index} but there are {len(modules)} --modules modules")
            targets = [i for i, m in enumerate(modules) if (index is None or i == index) and name in m.plugins]
            if not targets:
                known = sorted({n for m in modules for n in m.modality_names})
                raise ValueError(f"{flag} {spec!r}: no --modules module knows modality '{name}' (they know {known})")
            arr = _read_image(path, flag)
            for i in targets:
                plugin = modules[i].plugins[name]
                if flag == "--derive":
                    image = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
                    raw = plugin.derive(image, {})
                else:
                    raw = arr
                out[i][name] = plugin.to_tensor(raw)
    return out


def conditions_from_data(pipe, a: argparse.Namespace) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The first ``--n`` held-out samples; each module gets the (``--modalities``) maps it knows."""
    from mcm.evaluation.evaluate import load_data

    specs: dict[str, dict] = {}
    for m in pipe.modules:
        for n in m.modality_names:
            if not a.modalities or n in a.modalities:
                specs.setdefault(n, m.plugins[n].config())
    s = pipe.base.unet.config.sample_size
    size = (s if isinstance(s, int) else s[0]) * pipe.base.downsample
    data = load_data(a.data, specs, size, a.n)
    return [{n: data[n] for n in m.modality_names if n in specs} for m in pipe.modules], data


def regions_arg(a: argparse.Namespace, n_modules: int) -> list | None:
    if not a.regions:
        return None
    if len(a.regions) != n_modules:
        raise ValueError(f"--regions: got {len(a.regions)} masks for {n_modules} --modules modules; give one per "
                         f"module ('-' = everywhere)")
    from mcm.evaluation.strength_args import read_mask

    return [None if r == "-" else read_mask(r, "--regions") for r in a.regions]


# ---- 2. sampling ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_rows(pipe, conds: list[dict[str, torch.Tensor]], prompts: list[str] | None, n: int,
                a: argparse.Namespace) -> tuple[list[torch.Tensor], list[str]]:
    """Per seed: [base alone, each module alone] (``--compare``), then the composed samples; and a label per row
    (what was sampled, the weights and the scale, the seed of the row's first column)."""
    from mcm.evaluation.evaluate import SEED_STRIDE
    from mcm.pipelines.grids import adapter_display_name
    from mcm.pipelines.pipeline import MCMPipeline

    def name(m, w) -> str:
        return f"{adapter_display_name(m)} [{', '.join(m.modality_names)}]" + (f" x{w:g}" if w != 1 else "")

    regions = regions_arg(a, len(pipe.modules))
    variants = []
    if a.compare:
        variants.append((MCMPipeline.from_base(pipe.base, [], scheduler=pipe.scheduler), [], None, "base alone"))
        if len(pipe.modules) > 1 or pipe.weights != [1.0]:  # each alone, at its weight (and in its region)
            variants += [(MCMPipeline.from_base(pipe.base, [m], weights=[w], scheduler=pipe.scheduler), [c],
                          None if regions is None else [regions[i]], name(m, w) + " alone")
                         for i, (m, c, w) in enumerate(zip(pipe.modules, conds, pipe.weights))]
    label = " + ".join(name(m, w) for m, w in zip(pipe.modules, pipe.weights)) or "base alone"
    variants.append((pipe, conds, regions, ("composed: " if len(pipe.modules) > 1 else "base + ") + label
                     if pipe.modules else label))
    from mcm.evaluation.strength_args import strength_from_args
    from mcm.pipelines.pipeline import window_arguments

    strength = strength_from_args(a)
    scale = ("default scale" if strength is None else f"scale {strength:g}" if isinstance(strength, (int, float))
             else "scale map/schedule")
    rows, labels = [], []
    for s in a.seeds:
        seeds = [s * SEED_STRIDE + i for i in range(n)]
        for p, c, r, what in variants:
            given = any(c)
            labels.append(f"{what}{', ' + scale if given else ''}, seeds {seeds[0]}-{seeds[-1]}")
            rows.append(p(conditions=c if given else {}, prompt=prompts, num_images=None if given else n,
                          num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
                          conditioning_scale=strength if given else None, regions=r if given else None,
                          **window_arguments(a.window), seeds=seeds, height=getattr(a, "height", None),
                          width=getattr(a, "width", None), output_type="pt").images.float().cpu())
    return rows, labels


def save_image(image: torch.Tensor, out: str | Path) -> Path:
    """One ``(3, H, W)`` image in [0, 1] as a PNG at its own size."""
    from torchvision.utils import save_image as save

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(image.clamp(0, 1), out)
    return out


def save_grid(rows: list[torch.Tensor], out: str | Path, ncol: int, labels: list[str] | None = None) -> Path:
    """The rows as one grid, each labelled on its left (``labels``), tiles blown up (nearest) to be readable."""
    from mcm.pipelines.grids import labelled_grid

    size = rows[-1].shape[-2:]
    grid = torch.cat([torch.nn.functional.interpolate(r.float(), size=size, mode="nearest") for r in rows])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(grid, nrow=ncol, row_labels=labels, min_tile=64).save(out)
    return out


# ---- 3. the command --------------------------------------------------------------------------------------
def run_sample(a: argparse.Namespace) -> Path:
    from mcm.evaluation.evaluate import build_pipeline

    if a.steps < 1 or a.n < 1:
        raise ValueError(f"--steps and --n: expected >= 1, got {a.steps} and {a.n}")
    if a.data and (a.cond or a.derive):
        raise ValueError("--data and --cond/--derive: take the conditions from shards or from files, not both")
    if (a.cond or a.derive) and not a.mcm:
        raise ValueError("--cond/--derive need at least one --modules module to use them")
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = build_pipeline(a.mcm, a.base, a.weights, a.device)
    data: dict[str, Any] = {}
    if a.data and pipe.modules:
        conds, data = conditions_from_data(pipe, a)
    elif pipe.modules:
        conds = conditions_from_files(pipe.modules, a.cond, a.derive)
        # your own maps come out at --height/--width, else at the base's default size (as its diffusers
        # pipeline samples): each is resized by its plugin (label maps nearest)
        ds = pipe.base.downsample
        size = (a.height or pipe.base.sample_size[0] * ds, a.width or pipe.base.sample_size[1] * ds)
        conds = [{k: m.plugins[k].resize(x, size) if tuple(x.shape[-2:]) != size else x for k, x in c.items()}
                 for m, c in zip(pipe.modules, conds)]
        a.height = a.width = None  # the maps' size is the output size now
    else:
        conds = []
    batches = {x.shape[0] for c in conds for x in c.values()}
    n = batches.pop() if batches else (a.n if a.data or not pipe.modules else 1)
    prompts = None
    if pipe.base.is_text_conditional:
        prompts = [a.prompt] * n if a.prompt is not None else (list(data["caption"][:n]) if data else [""] * n)
    elif a.prompt:
        raise ValueError(f"--prompt {a.prompt!r}: the base '{pipe.base.source}' is not text-conditional")
    # rows: every input map once, the real images, then the samples
    vis, seen = [], []
    for m, c in zip(pipe.modules, conds):
        for name, x in c.items():
            if name not in seen:
                seen.append(name)
                vis.append(m.plugins[name].visualize(x).float().cpu())
    if data:
        vis.append(data["image"][:n])
        seen.append("real image")
    samples, labels = sample_rows(pipe, conds, prompts, n, a)
    rows = vis + samples
    if pipe.modules and not a.data and not a.compare and len(a.seeds) == 1 and n == 1:
        out = save_image(rows[-1][0], a.out)  # one image from your own maps: the image itself, at its size
    else:
        out = save_grid(rows, a.out, ncol=n, labels=seen + labels)
    log.info("mcm sample: %d modules (weights %s), %d conditions x %d seeds -> %s", len(pipe.modules),
             pipe.weights, n, len(a.seeds), out)
    return out


def _run(a: argparse.Namespace) -> int:
    run_sample(a)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("sample", help="sample the base with one or several (composed) modules into a grid",
                       description=__doc__.split("\n\n")[0])
    from mcm.evaluation.evaluate import add_module_args

    add_module_args(p)
    p.add_argument("--height", type=int, default=None, help="output height in pixels (default: the maps', else the "
                   "base's)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (default: the maps', else the base's)")
    p.add_argument("--data", default=None, help="held-out shards for the conditions (path, glob or brace pattern)")
    p.add_argument("--n", type=int, default=8, help="conditions read from --data (default 8)")
    p.add_argument("--modalities", nargs="+", default=None, help="with --data: only these modalities")
    p.add_argument("--cond", nargs="+", action="extend", default=[], metavar="[I:]MODALITY=PATH",
                   help="a map file per modality (repeat --cond or list several)")
    p.add_argument("--derive", nargs="+", action="extend", default=[], metavar="[I:]MODALITY=IMAGE",
                   help="derive the map from an RGB image with the plugin's preprocessing (e.g. sketch edges)")
    p.add_argument("--prompt", default=None, help="text for text-conditional bases (default: --data captions, else '')")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25, DDIM)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="noise seeds, one row each (default 0)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the base family pipeline's own)")
    p.add_argument("--conditioning-scale", "--strength", dest="strength", type=float, default=None,
                   help="the modules' scale s in p + s (p gamma + beta) (ControlNet: its conditioning scale); default: "
                   "each module's recorded default_strength; --strength is the earlier name")
    from mcm.evaluation.strength_args import add_strength_args

    add_strength_args(p)
    p.add_argument("--regions", nargs="+", default=None, metavar="PNG",
                   help="one greyscale mask per --modules (white = the module acts there; '-' = everywhere)")
    p.add_argument("--compare", action="store_true", help="also the base alone and each module alone, same seeds")
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=_run)
