"""The table of docs/ablations.md from ``docs/ablations.sh``'s runs and evaluations.

    python -m mcm.evaluation.ablation_report docs/ablations.yaml --out docs/ablations.md

Per variant: what changed, the exact command, steps reached (the exported checkpoint's ``global_step``),
wall time of ``mcm fit`` (``runs/ablation_<name>.seconds``), segmentation mIoU and sketch F1 (each map
alone) at strength 1 and at the best of the evaluated strengths, and judge-FID at strength 1.  A row with
``steps: N`` was trained for N steps (``STEPS=N docs/ablations.sh``), the others for the wall-clock budget.

With ``--out`` naming a file that holds the markers ``<!-- ablation table -->`` and ``<!-- /ablation table -->``,
only the text between them is replaced (the prose around the table is kept).

The spec may change where runs and evaluations are (``command``, ``run_prefix``, ``eval_prefix``; per row ``run``,
``eval``, ``command`` for a reference row made by another script), the markers (``marker``), and add
``condition_use: true``: the columns of ``python -m mcm.evaluation.condition_use`` (``condition_use.json`` next to
the row's metrics), how much lower the loss is with a sample's own maps than with another's per noise band.
(``docs/sketch_study.yaml`` is such a spec.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from mcm.evaluation.condition_use import gain

COMMAND = "mcm fit -c experiments/shapes32/multimodal.yaml"
TIME_BUDGET = "--trainer.max_time 00:00:10:00 --trainer.max_steps -1"


def _by(report: dict, modality: str, key: str) -> dict[float, float]:
    return {s["strength"]: s["metrics"][key] for s in report["settings"]
            if s["modalities"] == [modality] and s["metrics"].get(key) is not None}


#: condition_use bands shown (the noisy half, where the layout is decided)
USE_BANDS = ((400, 600), (600, 800), (800, 1000))


def _use_cells(path: Path) -> str:
    if not path.is_file():
        return " | ".join("–" for _ in USE_BANDS) + " | "
    rows = {tuple(r["band"]): r for r in json.loads(path.read_text())["rows"]}
    cells = []
    for band in USE_BANDS:
        r = rows.get(band)
        cells.append(f"{100 * gain(r):+.1f}%" if r else "–")
    return " | ".join(cells) + " | "


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def row(spec: dict[str, Any], root: Path, defaults: dict[str, Any] | None = None) -> str:
    d = defaults or {}
    name = spec["name"]
    run = root / spec.get("run", f"runs/{d.get('run_prefix', 'ablation_')}{name}")
    ev = root / spec.get("eval", f"docs/eval/{d.get('eval_prefix', 'ablation_')}{name}")
    report = json.loads((ev / "metrics.json").read_text())
    info = json.loads((run / "export" / "mcm_base.json").read_text())
    secs_file = Path(f"{run}.seconds")  # absent for a run stopped by hand (its last checkpoint evaluated)
    secs = secs_file.read_text().split()[-1] if secs_file.is_file() else None
    seg, sk = _by(report, "segmentation", "seg_miou"), _by(report, "sketch", "sketch_f1")
    fid = _by(report, "segmentation", "fid_judge")
    best = lambda d: max(d.items(), key=lambda kv: kv[1]) if d else (None, None)  # noqa: E731
    (s_seg, v_seg), (s_sk, v_sk) = best(seg), best(sk)
    if not fid:
        fid = _by(report, "sketch", "fid_judge")
    budget = f"--trainer.max_time 00:01:00:00 --trainer.max_steps {spec['steps']}" if spec.get("steps") else TIME_BUDGET
    cmd = spec.get("command") or f"{d.get('command', COMMAND)} {budget} {spec.get('args', '')}".strip()
    best_cell = lambda v, s_: "–" if v is None else f"{v:.3f} (s={s_:g})"  # noqa: E731
    use = _use_cells(ev / "condition_use.json") if d.get("condition_use") else ""
    return (f"| {name} | {spec['changed']} | `{cmd}` | {info.get('global_step')} | "
            f"{'–' if secs is None else f'{float(secs) / 60:.1f}'} | "
            f"{_fmt(seg.get(1.0))} | {best_cell(v_seg, s_seg)} | {_fmt(sk.get(1.0))} | "
            f"{best_cell(v_sk, s_sk)} | {_fmt(fid.get(1.0))} | {use}{spec['why']} |")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    spec = yaml.safe_load(Path(a.spec).read_text())
    root = Path(".")
    use = bool(spec.get("condition_use"))
    use_head = "".join(f"own vs other maps, t {lo}-{hi} | " for lo, hi in USE_BANDS) if use else ""
    cols = 11 + (len(USE_BANDS) if use else 0)
    lines = [f"Budget: {spec['budget']}. Held-out: 32 maps of the val split, seed 0, DDIM 20, no prompt.", "",
             "| variant | what changed | command | steps | fit wall [min] | seg mIoU, s=1 | seg mIoU, best | "
             f"sketch F1, s=1 | sketch F1, best | judge-FID, s=1 | {use_head}why |",
             "|" + "---|" * cols]
    for r in spec["rows"]:
        try:
            lines.append(row(r, root, spec))
        except FileNotFoundError as e:
            lines.append(f"| {r['name']} | {r['changed']} | not run yet ({Path(e.filename).name} missing) |"
                         + " |" * (cols - 3))
    text = "\n".join(lines) + "\n"
    if a.out:
        out = Path(a.out)
        old = out.read_text() if out.exists() else ""
        marker = spec.get("marker", "ablation table")
        begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
        if begin in old and end in old:
            head, rest = old.split(begin, 1)
            text = f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}"
        out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
