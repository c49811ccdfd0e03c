"""The table of docs/ablations.md from ``docs/ablations.sh``'s runs and evaluations.

    python -m mcm.evaluation.ablation_report docs/ablations.yaml --out docs/ablations.md

Per variant: what changed, the exact command, steps reached (the exported checkpoint's ``global_step``),
wall time of ``mcm fit`` (``runs/ablation_<name>.seconds``), segmentation mIoU and sketch F1 (each map
alone) at strength 1 and at the best of the evaluated strengths, and judge-FID at strength 1.  A row with
``steps: N`` was trained for N steps (``STEPS=N docs/ablations.sh``), the others for the wall-clock budget.

With ``--out`` naming a file that holds the markers ``<!-- ablation table -->`` and ``<!-- /ablation table -->``,
only the text between them is replaced (the prose around the table is kept).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

COMMAND = "mcm fit -c experiments/shapes32/multimodal.yaml"
TIME_BUDGET = "--trainer.max_time 00:00:10:00 --trainer.max_steps -1"
BEGIN, END = "<!-- ablation table -->", "<!-- /ablation table -->"


def _by(report: dict, modality: str, key: str) -> dict[float, float]:
    return {s["strength"]: s["metrics"][key] for s in report["settings"]
            if s["modalities"] == [modality] and s["metrics"].get(key) is not None}


def row(spec: dict[str, Any], root: Path) -> str:
    name = spec["name"]
    report = json.loads((root / "docs" / "eval" / f"ablation_{name}" / "metrics.json").read_text())
    info = json.loads((root / "runs" / f"ablation_{name}" / "export" / "mcm_base.json").read_text())
    secs = (root / "runs" / f"ablation_{name}.seconds").read_text().split()[-1]
    seg, sk = _by(report, "segmentation", "seg_miou"), _by(report, "sketch", "sketch_f1")
    fid = _by(report, "segmentation", "fid_judge")
    best = lambda d: max(d.items(), key=lambda kv: kv[1]) if d else (None, None)  # noqa: E731
    (s_seg, v_seg), (s_sk, v_sk) = best(seg), best(sk)
    budget = f"--trainer.max_time 00:01:00:00 --trainer.max_steps {spec['steps']}" if spec.get("steps") else TIME_BUDGET
    cmd = f"`{COMMAND} {budget} {spec.get('args', '')}`".replace(" `", "`")
    return (f"| {name} | {spec['changed']} | {cmd} | {info.get('global_step')} | {float(secs) / 60:.1f} | "
            f"{seg.get(1.0, float('nan')):.3f} | {v_seg:.3f} (s={s_seg:g}) | {sk.get(1.0, float('nan')):.3f} | "
            f"{v_sk:.3f} (s={s_sk:g}) | {fid.get(1.0, float('nan')):.3f} | {spec['why']} |")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    spec = yaml.safe_load(Path(a.spec).read_text())
    root = Path(".")
    lines = [f"Budget: {spec['budget']}. Held-out: 32 maps of the val split, seed 0, DDIM 20, no prompt.", "",
             "| variant | what changed | command | steps | fit wall [min] | seg mIoU, s=1 | seg mIoU, best | "
             "sketch F1, s=1 | sketch F1, best | judge-FID, s=1 | why |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in spec["rows"]:
        try:
            lines.append(row(r, root))
        except FileNotFoundError as e:
            lines.append(f"| {r['name']} | {r['changed']} | not run yet ({Path(e.filename).name} missing) | | | | | | | | |")
    text = "\n".join(lines) + "\n"
    if a.out:
        out = Path(a.out)
        old = out.read_text() if out.exists() else ""
        if BEGIN in old and END in old:
            head, rest = old.split(BEGIN, 1)
            text = f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}"
        out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
