"""A table of runs scored on ``test`` at the strength chosen on ``val`` (issue: honest figures).

    python -m mcm.evaluation.split_report docs/sketch_gap.yaml --out docs/ablations.md

The spec (YAML) names a ``metric`` (e.g. ``sketch_f1``), a ``modality`` (the map given alone), a ``marker`` and
``rows``; each row has ``name``, ``changed``, ``command``, ``run`` (the run directory: its last checkpoint's
``global_step``), ``val`` and ``test`` (``mcm evaluate`` output directories of the same export at the same
strengths).  Per row: the strength with the best ``val`` score, that score, and the ``test`` score and judge-FID
at that strength — so no figure in the ``test`` column was chosen on ``test``.  With ``--out`` naming a file that
holds ``<!-- MARKER -->`` and ``<!-- /MARKER -->``, only the text between them is replaced.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml


def _scores(eval_dir: Path, modality: str, metric: str) -> dict[float, dict[str, float]]:
    """Strength -> metrics of the settings with ``modality`` alone; ``{}`` where the evaluation was not run."""
    if not (eval_dir / "metrics.json").is_file():
        return {}
    report = json.loads((eval_dir / "metrics.json").read_text())
    return {s["strength"]: s["metrics"] for s in report["settings"]
            if s["modalities"] == [modality] and s["metrics"].get(metric) is not None}


def _steps(run: Path) -> str:
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return "–"
    return str(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", "–"))


def row(spec: dict[str, Any], metric: str, modality: str, root: Path) -> str:
    val = _scores(root / spec["val"], modality, metric)
    test = _scores(root / spec["test"], modality, metric)
    if not val:
        return f"| {spec['name']} | {spec['changed']} | `{spec['command']}` | not run | | | | | | {spec.get('why', '')} |"
    best = max(val, key=lambda s: val[s][metric])  # chosen on val
    at = test.get(best, {})
    cells = [spec["name"], spec["changed"], f"`{spec['command']}`", _steps(root / spec["run"]),
             ", ".join(f"{s:g}" for s in sorted(val)), f"{best:g}", f"{val[best][metric]:.3f}",
             f"{at[metric]:.3f}" if metric in at else "–",
             f"{at['fid_judge']:.3f}" if at.get("fid_judge") is not None else "–", spec.get("why", "")]
    return "| " + " | ".join(cells) + " |"


def table(spec: dict[str, Any], root: Path) -> str:
    metric, modality = spec["metric"], spec["modality"]
    head = (f"| variant | what changed | command | steps | strengths | strength chosen on val | {metric}, val | "
            f"**{metric}, test** | judge-FID, test | why |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([spec.get("budget", ""), "", head] + [row(r, metric, modality, root) for r in spec["rows"]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec")
    p.add_argument("--root", default=".")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    spec = yaml.safe_load(Path(a.spec).read_text())
    text = table(spec, Path(a.root))
    if a.out is None:
        print(text)
        return
    out = Path(a.out)
    start, end = f"<!-- {spec['marker']} -->", f"<!-- /{spec['marker']} -->"
    doc = out.read_text()
    if start not in doc or end not in doc:
        raise ValueError(f"--out {out}: expected the markers {start} and {end} around the table")
    head, rest = doc.split(start, 1)
    out.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
