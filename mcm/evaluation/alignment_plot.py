"""Alignment curves of a training run: every ``align/*`` scalar of the alignment callback against the step,
with the loss in its own panel, read from the run's offline wandb log (no sync, no network).

    python -m mcm.evaluation.alignment_plot runs/shapes32_multimodal --out docs/img/alignment_curve.png

``RUN_DIR`` is an experiment's save dir (``<dir>/wandb/latest-run``) or one ``offline-run-*`` directory.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from mcm.evaluation.wandb_offline import read_offline_run

log = logging.getLogger(__name__)

STEP = "trainer/global_step"
LOSSES = ("train/loss", "val/loss", "val/base_loss")
#: direction of each score, for the panel titles
HIGHER_IS_BETTER = {"seg_miou": True, "partial_miou": True, "sketch_f1": True, "depth_delta1": True,
                    "depth_ssi_rmse": False, "fid_judge": False}


def curves(history: list[dict], prefix: str = "align") -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` of every numeric ``<prefix>/*`` scalar and the losses, in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        if STEP not in row:
            continue
        images = tuple(k[:-len("_type")] for k in row if k.endswith("/_type"))  # wandb flattens an image's dict
        for key, value in row.items():
            if not (key.startswith(prefix + "/") or key in LOSSES) or key.startswith(images or ("\0",)):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # images (dicts) and non-finite values are not curves
            out.setdefault(key, []).append((int(row[STEP]), float(value)))
    return {k: sorted(v) for k, v in out.items()}


def reference_lines(metrics_json: str | Path) -> dict[str, dict[str, float]]:
    """``{metric: {"base alone": v, "real images": v}}`` from an ``mcm evaluate`` report of the base alone (its
    setting without modules, and the ``reference`` row of the real held-out images)."""
    import json

    report = json.loads(Path(metrics_json).read_text())
    rows = {"base alone": next((s["metrics"] for s in report.get("settings", []) if not s.get("mcm")), {}),
            "real images": (report.get("reference") or {}).get("metrics", {})}
    out: dict[str, dict[str, float]] = {}
    for label, metrics in rows.items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k, {})[label] = float(v)
    return out


def plot(series: dict[str, list[tuple[int, float]]], out: str | Path, title: str = "", prefix: str = "align",
         references: dict[str, dict[str, float]] | None = None) -> Path:
    """One panel per ``<prefix>/*`` scalar and a last one for the losses (log scale); PNG at ``out``.
    ``references``: horizontal lines per metric (:func:`reference_lines`: the base alone, the real images)."""
    from matplotlib.figure import Figure

    keys = sorted(k for k in series if k.startswith(prefix + "/"))
    if not keys:
        raise ValueError(f"no '{prefix}/*' scalars in this run (is the AlignmentCallback in its trainer.callbacks, "
                         f"and did a validation run end?); found {sorted(series) or 'nothing'}")
    n = len(keys) + 1
    cols = min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="o", ms=3, label="base + module")
        metric = key[len(prefix) + 1:].split("/")[0]
        lines = (references or {}).get(metric, {})
        for (label, v), style in zip(lines.items(), ("--", ":")):
            ax.axhline(v, ls=style, color="grey" if label == "base alone" else "green", lw=1, label=label)
        if lines:
            ax.legend(fontsize=7)
        better = HIGHER_IS_BETTER.get(metric)
        ax.set_title(key + ("" if better is None else (" (higher is better)" if better else " (lower is better)")),
                     fontsize=9)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    ax = axes[len(keys)]
    for key in LOSSES:
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key, lw=0.8 if key == "train/loss" else 1.5,
                    marker=None if key == "train/loss" else "o", ms=3, alpha=0.6 if key == "train/loss" else 1.0)
    if any(k in series for k in LOSSES):
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("loss", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="experiment save dir (with wandb/latest-run) or an offline-run-* directory")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--prefix", default="align", help="the callback's prefix (default align)")
    p.add_argument("--timeout", type=float, default=0.0, help="wait this long for a run still being written")
    p.add_argument("--reference", default=None, metavar="METRICS_JSON",
                   help="an `mcm evaluate` report of the base alone (metrics.json): draws its scores and the real "
                        "images' as horizontal lines (measured on its own maps and sampler; the lines show the range)")
    a = p.parse_args(argv)
    history, _ = read_offline_run(a.run_dir, timeout=a.timeout)
    refs = reference_lines(a.reference) if a.reference else None
    out = plot(curves(history, a.prefix), a.out, title=Path(a.run_dir).resolve().name, prefix=a.prefix,
               references=refs)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("alignment curves: %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
