"""Is the sketch alone limited by what its region hints say, or by how the module uses them?

    python -m mcm.evaluation.sketch_by_hint --mcm exports/my_mcm --data "data/shapes/val-*.tar" --n 64 --strength 2

Samples each held-out condition twice with the same seed, once from its sketch alone and once from its
segmentation map alone, scores both by sketch F1 against the sketch (the sketch judge), and groups the samples
by how well the sketch's fixed region hint (:func:`modalities.sketch_regions.enclosed_open_border` >= 1/2)
covers the true foreground (IoU).  If sketch-alone F1 rose with the hint's IoU to the segmentation-alone level,
the hint would be the limit; ``docs/ablations.md`` found it flat: the module does not turn an accurate hint
into a layout the way it turns a segmentation map into one.  Needs a module trained on both maps and shards
with both (the foreground is segmentation class != 0).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

BANDS = ((0.0, 0.5), (0.5, 0.8), (0.8, 1.01))


def hint_iou(sketch: torch.Tensor, segmentation: torch.Tensor) -> np.ndarray:
    """Per-sample foreground IoU of ``enclosed_open_border(sketch) >= 1/2`` against ``segmentation != 0``."""
    from modalities.masks import mask_iou
    from modalities.sketch_regions import enclosed_open_border

    return mask_iou(enclosed_open_border(sketch.float())[:, 0] >= 0.5, segmentation != 0).numpy()


def per_sample_f1(images: torch.Tensor, sketch: torch.Tensor) -> np.ndarray:
    from mcm.evaluation.metrics.sketch import edge_counts, plugin_edges, prf_from_counts

    edges = plugin_edges(images)
    return np.array([prf_from_counts(edge_counts(edges[i:i + 1], sketch[i:i + 1]))["f1"] for i in range(len(edges))])


def band_rows(iou: np.ndarray, f1: dict[str, np.ndarray]) -> list[dict]:
    """``[{"band", "n", <setting>: mean F1}]`` per band of hint IoU (empty bands are left out)."""
    rows = []
    for lo, hi in BANDS:
        sel = (iou >= lo) & (iou < hi)
        if sel.any():
            rows.append({"band": f"[{lo:g}, {min(hi, 1):g}]" if hi > 1 else f"[{lo:g}, {hi:g})", "n": int(sel.sum()),
                         **{k: round(float(v[sel].mean()), 4) for k, v in f1.items()}})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from mcm.evaluation import evaluate as E

    p = argparse.ArgumentParser(prog="python -m mcm.evaluation.sketch_by_hint", description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", "--mcm", dest="mcm", required=True, help="exported module trained on segmentation and sketch")
    p.add_argument("--base", default=None, help="base (default: the one the module names)")
    p.add_argument("--data", required=True, help="held-out shards with segmentation")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    pipe = E.build_pipeline([a.mcm], a.base, None, "cpu")
    module = pipe.modules[0]
    missing = sorted({"segmentation", "sketch"} - set(module.modality_names))
    if missing:
        raise SystemExit(f"--mcm {a.mcm}: trained on {module.modality_names}, needs {missing} too")
    specs = {n: module.plugins[n].config() for n in ("segmentation", "sketch")}
    data = E.load_data(a.data, specs, pipe.base.sample_size[0] * pipe.base.downsample, a.n)
    n = data["image"].shape[0]
    prompt = data["caption"] if pipe.base.is_text_conditional else None
    f1 = {}
    for name in ("sketch", "segmentation"):
        images = pipe(conditions=[{name: data[name]}], prompt=prompt, num_inference_steps=a.steps,
                      conditioning_scale=a.strength, seeds=list(range(n)), output_type="pt").images.float().cpu()
        f1[f"sketch F1, {name} alone"] = per_sample_f1(images, data["sketch"])
    iou = hint_iou(data["sketch"], data["segmentation"])
    rows = band_rows(iou, f1)
    print(f"{a.mcm}, strength {a.strength:g}, {n} samples of {a.data} (seed i for sample i, DDIM {a.steps}, captions);"
          f" by foreground IoU of the sketch's region hint (mean {iou.mean():.3f}):\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"| all | {n} | " + " | ".join(f"{v.mean():.4f}" for v in f1.values()) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"mcm": a.mcm, "strength": a.strength, "n": n, "rows": rows,
                                            "mean_hint_iou": float(iou.mean())}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
