"""docs/ablations.md's table: values read from each variant's evaluation, the best strength per modality,
the exact command per budget kind, and the prose around the table kept."""
from __future__ import annotations

import json

import yaml

from mcm.evaluation import ablation_report


def _setting(modality: str, strength: float, value: float, fid: float) -> dict:
    key = "seg_miou" if modality == "segmentation" else "sketch_f1"
    return {"modalities": [modality], "strength": strength, "metrics": {key: value, "fid_judge": fid}}


def _write_run(root, run: str, ev: str, step: int, secs: int | None, settings: list[dict]) -> None:
    """What a harness leaves: the evaluation's metrics.json, the export's mcm_base.json, the fit's seconds."""
    (root / ev).mkdir(parents=True)
    (root / run / "export").mkdir(parents=True)
    (root / ev / "metrics.json").write_text(json.dumps({"settings": settings}))
    (root / run / "export" / "mcm_base.json").write_text(json.dumps({"global_step": step}))
    if secs is not None:
        (root / f"{run}.seconds").write_text(f"{secs}\n")


def _write_spec_and_report(root, spec: dict, name: str, marker: str, before: str, after: str) -> str:
    """Write the spec, an --out file holding the markers around an old table, run the report; its text."""
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = root / name
    out.write_text(f"{before}<!-- {marker} -->\nold table\n<!-- /{marker} -->{after}")
    ablation_report.main([str(root / "spec.yaml"), "--out", str(out)])
    text = out.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    return text


def test_rows_values_best_strength_and_kept_prose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = [_setting("segmentation", 1.0, 0.4, 0.17), _setting("segmentation", 2.0, 0.8, 0.3),
                _setting("segmentation", 3.0, 0.7, 0.5), _setting("sketch", 1.0, 0.5, 0.2),
                _setting("sketch", 2.0, 0.45, 0.4)]
    for name, step, secs in (("a", 801, 615), ("b", 800, 1400)):
        _write_run(tmp_path, f"runs/ablation_{name}", f"docs/eval/ablation_{name}", step, secs, settings)
    spec = {"budget": "B", "rows": [{"name": "a", "changed": "x", "why": "y"},
                                    {"name": "b", "steps": 800, "changed": "x2", "why": "y2", "args": "--m.lr 1"},
                                    {"name": "c", "changed": "never run", "why": "z"}]}
    text = _write_spec_and_report(tmp_path, spec, "ablations.md", "ablation table", "intro\n", "\n\nreading\n")
    rows = [line for line in text.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    a, b = (r.split(" | ") for r in rows)
    assert a[3:10] == ["801", "10.2", "0.400", "0.800 (s=2)", "0.500", "0.500 (s=1)", "0.170"]
    assert a[2] == "`mcm fit -c experiments/shapes32/multimodal.yaml --trainer.max_time 00:00:10:00 --trainer.max_steps -1`"
    assert b[2].endswith("--trainer.max_steps 800 --m.lr 1`") and b[3:5] == ["800", "23.3"]
    assert "| c | never run | not run yet (metrics.json missing)" in text


def test_sketch_study_spec_prefixes_reference_rows_and_condition_use(tmp_path, monkeypatch):
    """Another spec (docs/sketch_study.yaml's kind): its own run / eval folders, command and markers, a reference
    row with its own paths and command, '–' for a modality not evaluated, and condition_use gains per band."""
    monkeypatch.chdir(tmp_path)
    settings = [_setting("sketch", 1.0, 0.45, 0.2), _setting("sketch", 3.0, 0.56, 0.3)]
    for run, ev, step, secs in (("runs/sk_v", "docs/eval/sketch_v", 600, 600), ("runs/ref", "docs/eval/ref", 589, None)):
        _write_run(tmp_path, run, ev, step, secs, settings)
    rows = [{"band": [400, 600], "own": 0.9, "other": 1.0, "base": 1.0},
            {"band": [800, 1000], "own": 0.5, "other": 0.4, "base": 1.0}]
    (tmp_path / "docs/eval/sketch_v/condition_use.json").write_text(json.dumps({"rows": rows}))
    spec = {"budget": "B", "command": "mcm fit -c experiments/shapes32/sketch.yaml", "run_prefix": "sk_",
            "eval_prefix": "sketch_", "marker": "sketch table", "condition_use": True,
            "rows": [{"name": "v", "steps": 600, "changed": "x", "why": "y", "args": "--a 1"},
                     {"name": "ref", "run": "runs/ref", "eval": "docs/eval/ref", "command": "other.sh ref",
                      "changed": "r", "why": "z"}]}
    text = _write_spec_and_report(tmp_path, spec, "study.md", "sketch table", "a\n", "\nb\n")
    v = next(line for line in text.splitlines() if line.startswith("| v |")).split(" | ")
    ref = next(line for line in text.splitlines() if line.startswith("| ref |")).split(" | ")
    assert v[2] == "`mcm fit -c experiments/shapes32/sketch.yaml --trainer.max_time 00:01:00:00 --trainer.max_steps 600 --a 1`"
    assert v[3:14] == ["600", "10.0", "–", "–", "0.450", "0.560 (s=3)", "0.200", "+10.0%", "–", "-25.0%", "y |"]
    assert ref[2] == "`other.sh ref`" and ref[3:5] == ["589", "–"] and ref[10:13] == ["–", "–", "–"]
