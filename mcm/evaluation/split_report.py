"""A table of runs scored on ``test`` at the strength chosen on ``val`` (issue: honest figures).

    python -m mcm.evaluation.split_report docs/sketch_gap.yaml --out docs/ablations.md

The spec (YAML) names a ``metric`` (e.g. ``sketch_f1``), a ``modality`` (the map given alone), a ``marker`` and
``rows``; each row has ``name``, ``changed``, ``command``, ``run`` (the run directory: its last checkpoint's
``global_step``), ``val`` and ``test`` (``mcm evaluate`` output directories of the same export, or lists of them:
their strengths pooled).  Per row: the strength with the best ``val`` score, that score, and the ``test`` score and
judge-FID at that strength — so no figure in the ``test`` column was chosen on ``test``.

``quality_of`` (optional, a row's name, e.g. the baseline's): a second choice per row, the best ``val`` score among
the strengths whose ``val`` judge-FID is no worse than that row's at its own chosen strength — the score at the
baseline's realism, where pushing the strength up trades realism for alignment.  With ``--out`` naming a file that
holds ``<!-- MARKER -->`` and ``<!-- /MARKER -->``, only the text between them is replaced.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml


def _scores(eval_dirs: Path | list[Path], modality: str, metric: str) -> dict[float, dict[str, float]]:
    """Strength -> metrics of the settings with ``modality`` alone, over one or several evaluation directories;
    ``{}`` where none was run."""
    out: dict[float, dict[str, float]] = {}
    for eval_dir in eval_dirs if isinstance(eval_dirs, list) else [eval_dirs]:
        if not (eval_dir / "metrics.json").is_file():
            continue
        report = json.loads((eval_dir / "metrics.json").read_text())
        out.update({s["strength"]: s["metrics"] for s in report["settings"]
                    if s["modalities"] == [modality] and s["metrics"].get(metric) is not None})
    return out


def _dirs(root: Path, spec: str | list[str]) -> list[Path]:
    return [root / d for d in ([spec] if isinstance(spec, str) else spec)]


def _steps(run: Path) -> str:
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return "–"
    return str(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", "–"))


def _fid(metrics: dict[str, float]) -> str:
    return f"{metrics['fid_judge']:.3f}" if metrics.get("fid_judge") is not None else "–"


def chosen(spec: dict[str, Any], metric: str, modality: str, root: Path, fid_cap: float | None = None
           ) -> tuple[float | None, dict, dict]:
    """``(strength, val metrics, test metrics)`` of the row's best ``val`` score (among strengths whose ``val``
    judge-FID is at most ``fid_cap``, if given); ``(None, {}, {})`` where none qualifies."""
    val = _scores(_dirs(root, spec["val"]), modality, metric)
    test = _scores(_dirs(root, spec["test"]), modality, metric)
    if fid_cap is not None:
        val = {s: m for s, m in val.items() if m.get("fid_judge") is not None and m["fid_judge"] <= fid_cap}
    if not val:
        return None, {}, {}
    best = max(val, key=lambda s: val[s][metric])
    return best, val[best], test.get(best, {})


def row(spec: dict[str, Any], metric: str, modality: str, root: Path, fid_cap: float | None = None) -> str:
    val = _scores(_dirs(root, spec["val"]), modality, metric)
    if not val:
        return (f"| {spec['name']} | {spec['changed']} | `{spec['command']}` | not run | | | | | |"
                f"{' | | |' if fid_cap is not None else ''} {spec.get('why', '')} |")
    best, at_val, at = chosen(spec, metric, modality, root)
    cells = [spec["name"], spec["changed"], f"`{spec['command']}`", _steps(root / spec["run"]),
             ", ".join(f"{s:g}" for s in sorted(val)), f"{best:g}", f"{at_val[metric]:.3f}",
             f"{at[metric]:.3f}" if metric in at else "–", _fid(at)]
    if fid_cap is not None:
        q, _, at_q = chosen(spec, metric, modality, root, fid_cap)
        cells += ["–", "–", "–"] if q is None else [f"{q:g}", f"{at_q[metric]:.3f}" if metric in at_q else "–",
                                                    _fid(at_q)]
    cells.append(spec.get("why", ""))
    return "| " + " | ".join(cells) + " |"


def table(spec: dict[str, Any], root: Path) -> str:
    metric, modality = spec["metric"], spec["modality"]
    fid_cap, extra = None, ""
    if spec.get("quality_of"):
        ref = next(r for r in spec["rows"] if r["name"] == spec["quality_of"])
        _, ref_val, _ = chosen(ref, metric, modality, root)
        fid_cap = ref_val.get("fid_judge")
        extra = (f" strength with val judge-FID <= {spec['quality_of']}'s ({fid_cap:.3f}) | {metric}, test, there | "
                 "judge-FID, test, there |") if fid_cap is not None else ""
    head = (f"| variant | what changed | command | steps | strengths | strength chosen on val | {metric}, val | "
            f"**{metric}, test** | judge-FID, test |{extra} why |\n"
            f"|{'---|' * (10 + (3 if extra else 0))}")
    return "\n".join([spec.get("budget", ""), "", head] + [row(r, metric, modality, root, fid_cap)
                                                          for r in spec["rows"]])


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
