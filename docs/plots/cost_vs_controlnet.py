"""The README's cost picture: training-step time in base forwards and peak memory over inference, for the MCM,
the MCM from cached predictions, ControlNet and full fine-tuning, read from the bench JSON (no new timing).

    python docs/plots/cost_vs_controlnet.py --out docs/img/cost_vs_controlnet.png

Sources: ``docs/bench/train_step_sd15_bf16.json`` (``python bench/train_step.py --quick --base-dtype bfloat16``,
SD 1.5's architecture with random weights at 256 px, 2 CPU cores) for the MCM, ControlNet and fine-tuning;
``docs/bench/train_step_sd15_cached.json`` (the same bench with an fp32 base) for the step from cached
predictions, whose ratio is to that run's own base forward.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "cost_vs_controlnet.png"))
    a = p.parse_args(argv)
    bf16 = json.loads((ROOT / "docs/bench/train_step_sd15_bf16.json").read_text())["sd15"]
    cached = json.loads((ROOT / "docs/bench/train_step_sd15_cached.json").read_text())["sd15"]
    steps = [("MCM", bf16["mcm_step_over_base_forward"]),
             ("MCM, cached\npredictions*", cached["mcm_step_from_cached_predictions_over_base_forward"]),
             ("ControlNet", bf16["controlnet_step_over_base_forward"]),
             ("full\nfine-tuning", bf16["finetune_step_over_base_forward"])]
    memory = [("MCM", bf16["mcm_peak_mem_over_base_inference"]),
              ("ControlNet", bf16["controlnet_peak_mem_over_base_inference"]),
              ("full\nfine-tuning", bf16["finetune_peak_mem_over_base_inference"])]
    colours = {"MCM": "#2b6cb0", "ControlNet": "#c05621", "full\nfine-tuning": "#718096"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    for ax, rows, title in ((axes[0], steps, "training step / one base forward"),
                            (axes[1], memory, "peak memory / base inference")):
        names, values = zip(*rows)
        bars = ax.barh(range(len(rows)), values, color=[colours.get(n, "#63b3ed") for n in names])
        ax.set_yticks(range(len(rows)), names, fontsize=9)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
        ax.set_xlim(0, max(values) * 1.2)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Stable Diffusion 1.5 architecture (random weights), 256 px, batch 1, bf16 base, 2 CPU cores",
                 fontsize=9)
    fig.text(0.01, 0.01, "* measured in the fp32-base run against its own base forward "
             "(docs/bench/train_step_sd15_cached.json)", fontsize=7, color="#4a5568")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
