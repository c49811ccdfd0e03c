"""MCM, ControlNet and T2I-Adapter side by side on the same held-out maps and seeds, each at its own scale.

    python docs/plots/side_by_side.py --modality segmentation \\
        --modules MCM=runs/wallclock_mcm_segmentation/export@2 ControlNet=runs/wallclock_controlnet_segmentation/export@2 \\
                  T2I-Adapter=runs/wallclock_t2i_adapter_segmentation/export@1 \\
        --data "data/shapes/test-*.tar" --out docs/img/side_by_side_segmentation.png

Rows: the map, the base alone, then each module (``NAME=EXPORT@SCALE``: the scale each was recorded at on the
``val`` split); columns: the first ``--n`` held-out maps, seed ``i`` in column ``i`` in every row (DDIM, ``--steps``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> Path:
    from mcm.evaluation.evaluate import load_data
    from mcm.pipelines import MCMPipeline
    from mcm.pipelines.grids import labelled_grid

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modality", default="segmentation")
    p.add_argument("--modules", nargs="+", required=True, metavar="NAME=EXPORT@SCALE")
    p.add_argument("--data", required=True, help="held-out shards")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    specs = []
    for spec in a.modules:
        name, _, rest = spec.partition("=")
        path, _, scale = rest.rpartition("@")
        if not name or not path or not scale:
            raise SystemExit(f"--modules {spec!r}: expected NAME=EXPORT@SCALE")
        specs.append((name, path, float(scale)))
    pipes = [(name, MCMPipeline.from_pretrained(path), s) for name, path, s in specs]
    base = MCMPipeline.from_base(pipes[0][1].base, [], scheduler=pipes[0][1].scheduler)
    base.set_progress_bar_config(disable=True)
    plugin = pipes[0][1].modules[0].plugins[a.modality]
    data = load_data(a.data, {a.modality: plugin.config()}, 32, a.n)
    maps, seeds = data[a.modality][: a.n], list(range(a.n))
    rows, labels = [plugin.visualize(maps).float().cpu()], [f"{a.modality} (held-out)"]
    rows.append(base(num_images=len(maps), seeds=seeds, num_inference_steps=a.steps, output_type="pt").images.cpu())
    labels.append(f"base alone, seeds 0-{a.n - 1}")
    for name, pipe, s in pipes:
        pipe.set_progress_bar_config(disable=True)
        rows.append(pipe(conditions={a.modality: maps}, seeds=seeds, num_inference_steps=a.steps,
                         conditioning_scale=s, output_type="pt").images.cpu())
        labels.append(f"base + {name}, scale {s:g}, seeds 0-{a.n - 1}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(torch.cat(rows), nrow=len(maps), row_labels=labels, min_tile=96).save(out)
    print(out)
    return out


if __name__ == "__main__":
    main()
