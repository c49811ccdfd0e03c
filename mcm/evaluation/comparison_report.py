"""One table comparing control methods: ``python -m mcm.evaluation.comparison_report SPEC.yaml --out TABLE.md``.

The spec lists rows (each an ``mcm evaluate`` output directory, the training run and the exported
module(s) behind it) and the two bench JSONs that give the cost ratios. Every number in the table is
read from those files; nothing is typed in by hand. Example spec: ``docs/comparison.yaml``.

Rows expand to one line per evaluated setting (a multimodal module evaluated ``--per-modality``
gives one line per modality subset).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mcm.evaluation.eval_report import LABELS

METHODS = ("base", "mcm", "controlnet", "t2i_adapter", "compose")
ALIGNMENT = ("seg_miou", "partial_miou", "sketch_f1", "depth_ssi_rmse", "depth_delta1")
QUALITY = ("fid_judge", "kid_judge", "diversity")


def count_params(module_dirs: Sequence[str | Path]) -> int:
    """Trainable parameters of exported modules: every tensor in their safetensors files."""
    from safetensors import safe_open

    total = 0
    for d in module_dirs:
        files = sorted(Path(d).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{d}: no .safetensors file (expected an `mcm export` directory)")
        for f in files:
            with safe_open(str(f), "pt") as sf:
                total += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return total


def cost_ratios(method: str, train: Mapping[str, Any] | None, sample: Mapping[str, Any] | None) -> dict:
    """(training step / base forward, peak training memory / base inference, sampling step / base step)."""
    out = {"train_step": None, "train_mem": None, "sample_step": None}
    if method == "base":
        return {"train_step": 0.0, "train_mem": 0.0, "sample_step": 1.0}
    if method == "t2i_adapter":  # not in the bench JSONs: its costs are not measured side by side (yet)
        return out
    if train:
        key = "controlnet" if method == "controlnet" else "mcm"
        out["train_step"] = train.get(f"{key}_step_over_base_forward")
        out["train_mem"] = train.get(f"{key}_peak_mem_over_base_inference")
    if sample:
        key = {"mcm": "mcm", "controlnet": "controlnet", "compose": "compose2"}[method]
        v = sample.get(f"{key}_sampling_overhead")
        out["sample_step"] = None if v is None else 1.0 + v
    return out


def run_seconds_per_step(run_dirs: Sequence[str | Path]) -> float | None:
    """Measured wall seconds per step of the training run(s) (summed for composed modules)."""
    from mcm.evaluation.wandb_offline import read_offline_run, seconds_per_step

    total = 0.0
    for d in run_dirs:
        v = seconds_per_step(read_offline_run(d)[0])
        if v is None:
            return None
        total += v
    return total


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
    return f"{v:.{digits}f}"


def _listify(v: Any) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def build_rows(spec: Mapping[str, Any], root: Path) -> list[dict]:
    bench = spec.get("bench", {})
    model = bench.get("model", "shapes32")
    load = lambda p: json.loads((root / p).read_text()).get(model) if p else None  # noqa: E731
    train, sample = load(bench.get("train_step")), load(bench.get("sample"))
    rows = []
    for r in spec["rows"]:
        method = r.get("method", "mcm")
        if method not in METHODS:
            raise ValueError(f"row {r.get('label')!r}: method {method!r}, expected one of {METHODS}")
        report = json.loads((root / r["eval"] / "metrics.json").read_text())
        modules = [root / m for m in _listify(r.get("modules"))]
        runs = [root / d for d in _listify(r.get("runs"))]
        params = count_params(modules) if modules else 0
        sps = run_seconds_per_step(runs) if runs else None
        wanted = r.get("settings")  # optional filter: list of modality lists
        for s in report["settings"]:
            if wanted is not None and sorted(s["modalities"]) not in [sorted(w) for w in wanted]:
                continue
            rows.append({"label": r["label"], "method": method, "modalities": s["modalities"],
                         "strength": s["strength"], "params": params, "run_s_per_step": sps,
                         "train_steps": r.get("steps"), **cost_ratios(method, train, sample),
                         "metrics": s["metrics"]})
        if r.get("reference") and report.get("reference"):
            rows.append({"label": "*real held-out images*", "method": "reference",
                         "modalities": report["reference"]["modalities"], "strength": None, "params": None,
                         "run_s_per_step": None, "train_steps": None, "train_step": None, "train_mem": None,
                         "sample_step": None, "metrics": report["reference"]["metrics"]})
    return rows


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [k for k in (*ALIGNMENT, *QUALITY) if any(r["metrics"].get(k) is not None for r in rows)]
    head = ("| method | conditions (strength) | trainable params | training steps | train step / base fwd | "
            "train mem / base inf | s/step in run | sampling step / base | " + " | ".join(keys) + " |")
    sep = "|---|---|---|---|---|---|---|---|" + "---|" * len(keys)
    lines = [head, sep]
    for r in rows:
        cond = ", ".join(r["modalities"]) or "–"
        if r["method"] not in ("base", "reference") and r["strength"] is not None and r["strength"] != 1:
            cond += f" (s={r['strength']:g})"
        cells = [r["label"], cond, _fmt(r["params"]), _fmt(r["train_steps"]),
                 _fmt(r["train_step"], 2), _fmt(r["train_mem"], 2), _fmt(r["run_s_per_step"], 2),
                 _fmt(r["sample_step"], 2)] + [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    legend = "; ".join(f"`{k}` {LABELS[k]}" for k in keys if k in LABELS)
    return "\n".join(lines) + "\n\nColumns: " + legend + ".\n"


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m mcm.evaluation.comparison_report", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="YAML: bench: {model, train_step, sample}, rows: [{label, method, eval, modules, "
                                "runs, steps, settings, reference}]")
    p.add_argument("--root", default=".", help="paths in the spec are relative to this (default: cwd)")
    p.add_argument("--out", help="write the markdown table here (default: print)")
    a = p.parse_args(argv)
    spec = yaml.safe_load(Path(a.spec).read_text())
    if not isinstance(spec, dict) or not spec.get("rows"):
        raise SystemExit(f"{a.spec}: expected a mapping with a non-empty 'rows' list")
    text = markdown(build_rows(spec, Path(a.root)))
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
