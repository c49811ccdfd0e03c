"""The report of ``mcm evaluate``: markdown table, sample grids and matplotlib plots.

Plots (PNG, matplotlib's object API, no pyplot state):

* ``alignment_vs_strength.png`` — each alignment metric against the modulation strength;
* ``quality_vs_alignment.png`` — judge-space FID against each alignment metric (one point per setting);
* ``alignment_vs_train_images.png`` — alignment and FID against the number of training images,
  from several earlier ``metrics.json`` (``mcm evaluate --curve 250=a/metrics.json 500=b/metrics.json``
  or :func:`plot_data_curve` from Python).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

ALIGNMENT_KEYS = ("seg_miou", "partial_miou", "sketch_f1", "depth_delta1")
LABELS = {
    "seg_miou": "segmentation mIoU", "seg_pixel_acc": "segmentation pixel acc.", "partial_miou": "partial-mask mIoU",
    "partial_pixel_acc": "partial-mask pixel acc.", "sketch_f1": "sketch F1", "sketch_precision": "sketch precision",
    "sketch_recall": "sketch recall", "depth_ssi_rmse": "depth ssi-RMSE (lower better)",
    "depth_delta1": "depth delta<1.25", "fid_judge": "FID, judge features (lower better)",
    "kid_judge": "KID, judge features (lower better)", "fid_inception": "FID, Inception (lower better)",
    "diversity": "diversity (pairwise RMS)", "clip_score": "CLIP score",
}


def setting_label(s: Mapping[str, Any], with_strength: bool = False) -> str:
    mods = "+".join(s["modalities"]) or "none"
    who = "base alone" if not s["mcm"] else " + ".join(Path(m).name for m in s["mcm"])
    return f"{who}: {mods}" + (f" @ s={s['strength']:g}" if with_strength else "")


def short_summary(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in ALIGNMENT_KEYS + ("fid_judge",) if metrics.get(k) is not None)


# ---- grids ------------------------------------------------------------------------------------------------
def save_setting_grid(out: Path, index: int, setting: Mapping[str, Any], images: torch.Tensor, data: Mapping,
                      pipe, specs: Mapping[str, dict], max_cols: int = 8) -> Path:
    """Rows: each input map, the real held-out image, then one row of samples per seed."""
    import modalities as registry
    from torchvision.utils import save_image

    from mcm.pipelines.grids import grid_image

    k = min(max_cols, images.shape[1])
    size = images.shape[-2:]
    rows = []
    for name in setting["modalities"]:
        vis = registry.get(name, **specs.get(name, {})).visualize(data[name][:k]).float().cpu()
        rows.append(torch.nn.functional.interpolate(vis, size=size, mode="nearest"))
    rows.append(data["image"][:k])
    rows += [images[s, :k] for s in range(images.shape[0])]
    tag = "+".join(setting["modalities"]) or "none"
    path = out / "grids" / f"{index:02d}_{tag}_s{setting['strength']:g}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat(rows)
    scale = max(1, 64 // size[0])  # small samples are blown up (nearest) so the grid is readable
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    save_image(grid_image(grid, nrow=k), path)
    return path


# ---- markdown -------------------------------------------------------------------------------------------
def markdown_table(report: Mapping[str, Any]) -> str:
    settings = report["settings"]
    keys = [k for k in LABELS if any(s["metrics"].get(k) is not None for s in settings)]
    head = "| MCM | modalities | strength | " + " | ".join(keys) + " |"
    sep = "|---|---|---|" + "---|" * len(keys)
    rows = []
    for s in settings:
        who = "base alone" if not s["mcm"] else ", ".join(
            f"{Path(m).name}" + (f" (w={w:g})" if len(s["mcm"]) > 1 else "") for m, w in zip(s["mcm"], s["weights"]))
        vals = ["–" if s["metrics"].get(k) is None else f"{s['metrics'][k]:.4f}" for k in keys]
        rows.append(f"| {who} | {', '.join(s['modalities'])} | {s['strength']:g} | " + " | ".join(vals) + " |")
    ref = report.get("reference")
    if ref:  # the held-out images themselves: what the judges allow at best
        vals = ["–" if ref["metrics"].get(k) is None else f"{ref['metrics'][k]:.4f}" for k in keys]
        rows.append(f"| *real held-out images* | {', '.join(ref['modalities'])} | – | " + " | ".join(vals) + " |")
    return "\n".join([head, sep, *rows])


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    j = report["judges"]
    text = (f"# mcm evaluate\n\nBase `{report['base']}`, data `{report['data']}`: {report['n']} held-out conditions x "
            f"seeds {report['seeds']}, {report['steps']} sampling steps, guidance {report['guidance_scale']:g}, "
            f"prompts: {report['prompts']}, sketch tolerance {report['sketch_tolerance']} px.\n"
            f"Judges: segmentation `{j['segmentation']}`, depth `{j['depth']}`, FID/KID features `{j['features']}`.\n\n"
            + markdown_table(report) + "\n\nThe last row scores the real held-out images against their own maps: "
            "the ceiling the judges allow (their own errors included).\n\nColumns: "
            + "; ".join(f"`{k}` {v}" for k, v in LABELS.items()) + ".\n")
    path.write_text(text)
    return path


# ---- plots ---------------------------------------------------------------------------------------------------
def _figure(n_panels: int):
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def _groups(settings: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list] = {}
    for s in settings:
        groups.setdefault(setting_label(s), []).append(s)
    return groups


def plot_alignment_vs_strength(report: Mapping[str, Any], path: Path) -> Path | None:
    settings = report["settings"]
    keys = [k for k in ALIGNMENT_KEYS + ("depth_ssi_rmse",) if any(s["metrics"].get(k) is not None for s in settings)]
    if not keys:
        return None
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for label, group in _groups(settings).items():
            pts = sorted((s["strength"], s["metrics"][key]) for s in group if s["metrics"].get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("modulation strength s")
        ax.set_ylabel(LABELS[key])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def plot_quality_vs_alignment(report: Mapping[str, Any], path: Path) -> Path | None:
    settings = [s for s in report["settings"] if s["metrics"].get("fid_judge") is not None]
    keys = [k for k in ALIGNMENT_KEYS if any(s["metrics"].get(k) is not None for s in settings)]
    if not keys:
        return None
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for label, group in _groups(settings).items():
            pts = [(s["metrics"][key], s["metrics"]["fid_judge"], s["strength"]) for s in group
                   if s["metrics"].get(key) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=":", label=label)
            for x, y, st in pts:
                ax.annotate(f"s={st:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(LABELS[key] + " (better →)")
        ax.set_ylabel(LABELS["fid_judge"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def parse_curves(specs: Sequence[str]) -> dict[str, dict]:
    """``["250=a/metrics.json", ...]`` -> ``{"250": report, ...}``."""
    out = {}
    for spec in specs:
        label, sep, file = spec.partition("=")
        if not sep or not file:
            raise ValueError(f"--curve {spec!r}: expected N=path/to/metrics.json (N = number of training images)")
        out[label] = json.loads(Path(file).read_text())
    return out


def plot_data_curve(curves: Mapping[Any, str | Path | Mapping], path: str | Path,
                    keys: Sequence[str] = ALIGNMENT_KEYS + ("fid_judge",)) -> Path | None:
    """Alignment and FID against the number of training images.

    Args:
        curves: number of training images (or any label) -> a ``metrics.json`` path or its loaded content.
            Each setting (modalities x strength) becomes one line across the curve points.
    """
    reports = {str(k): (json.loads(Path(v).read_text()) if isinstance(v, (str, Path)) else v)
               for k, v in curves.items()}
    labels = list(reports)
    numeric = all(l.replace(".", "", 1).isdigit() for l in labels)
    xs = {l: (float(l) if numeric else i) for i, l in enumerate(labels)}
    lines: dict[str, list] = {}
    for l, rep in reports.items():
        for s in rep["settings"]:
            name = f"{'+'.join(s['modalities']) or 'none'} @ s={s['strength']:g}"
            lines.setdefault(name, []).append((xs[l], s["metrics"]))
    keys = [k for k in keys if any(m.get(k) is not None for pts in lines.values() for _, m in pts)]
    if not keys:
        return None
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for name, pts in lines.items():
            p = sorted((x, m[key]) for x, m in pts if m.get(key) is not None)
            if p:
                ax.plot(*zip(*p), marker="o", label=name)
        ax.set_xlabel("training images")
        if numeric:
            ax.set_xscale("log")
            ax.set_xticks([xs[l] for l in labels], labels)
            ax.minorticks_off()  # the log axis's minor labels (3x10^2, ...) overprinted the ticks we set
        else:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(LABELS.get(key, key))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_all(out: Path, report: Mapping[str, Any], curves: Sequence[str] | None = None) -> list[Path]:
    """``metrics.md`` and every plot that has data; returns the written paths."""
    written = [write_markdown(report, out / "metrics.md"),
               plot_alignment_vs_strength(report, out / "alignment_vs_strength.png"),
               plot_quality_vs_alignment(report, out / "quality_vs_alignment.png")]
    if curves:
        written.append(plot_data_curve(parse_curves(curves), out / "alignment_vs_train_images.png"))
    return [p for p in written if p is not None]


def curve_table(curves: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = ALIGNMENT_KEYS + ("fid_judge",
                                                                                                "kid_judge")) -> str:
    """Markdown: one row per curve point (number of training images) and setting."""
    rows = [(n, s) for n, rep in curves.items() for s in rep["settings"]]
    keys = [k for k in keys if any(s["metrics"].get(k) is not None for _, s in rows)]
    lines = ["| training images | conditions | strength | " + " | ".join(LABELS.get(k, k) for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for n, s in rows:
        vals = ["–" if s["metrics"].get(k) is None else f"{s['metrics'][k]:.4f}" for k in keys]
        lines.append(f"| {n} | {', '.join(s['modalities'])} | {s['strength']:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"

