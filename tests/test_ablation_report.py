"""docs/ablations.md's table: values read from each variant's evaluation, the best strength per modality,
the exact command per budget kind, and the prose around the table kept."""
from __future__ import annotations

import json

import yaml

from mcm.evaluation import ablation_report


def _setting(modality: str, strength: float, value: float, fid: float) -> dict:
    key = "seg_miou" if modality == "segmentation" else "sketch_f1"
    return {"modalities": [modality], "strength": strength, "metrics": {key: value, "fid_judge": fid}}


def test_rows_values_best_strength_and_kept_prose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, step, secs in (("a", 801, 615), ("b", 800, 1400)):
        (tmp_path / "docs" / "eval" / f"ablation_{name}").mkdir(parents=True)
        (tmp_path / "runs" / f"ablation_{name}" / "export").mkdir(parents=True)
        settings = [_setting("segmentation", 1.0, 0.4, 0.17), _setting("segmentation", 2.0, 0.8, 0.3),
                    _setting("segmentation", 3.0, 0.7, 0.5), _setting("sketch", 1.0, 0.5, 0.2),
                    _setting("sketch", 2.0, 0.45, 0.4)]
        (tmp_path / "docs" / "eval" / f"ablation_{name}" / "metrics.json").write_text(json.dumps({"settings": settings}))
        (tmp_path / "runs" / f"ablation_{name}" / "export" / "mcm_base.json").write_text(json.dumps({"global_step": step}))
        (tmp_path / "runs" / f"ablation_{name}.seconds").write_text(f"{secs}\n")
    spec = {"budget": "B", "rows": [{"name": "a", "changed": "x", "why": "y"},
                                    {"name": "b", "steps": 800, "changed": "x2", "why": "y2", "args": "--m.lr 1"},
                                    {"name": "c", "changed": "never run", "why": "z"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "ablations.md"
    out.write_text(f"intro\n{ablation_report.BEGIN}\nold table\n{ablation_report.END}\n\nreading\n")
    ablation_report.main([str(tmp_path / "spec.yaml"), "--out", str(out)])
    text = out.read_text()
    assert text.startswith("intro\n") and text.endswith("\n\nreading\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    a, b = (r.split(" | ") for r in rows)
    assert a[3:10] == ["801", "10.2", "0.400", "0.800 (s=2)", "0.500", "0.500 (s=1)", "0.170"]
    assert a[2] == "`mcm fit -c experiments/shapes32/multimodal.yaml --trainer.max_time 00:00:10:00 --trainer.max_steps -1`"
    assert b[2].endswith("--trainer.max_steps 800 --m.lr 1`") and b[3:5] == ["800", "23.3"]
    assert "| c | never run | not run yet (metrics.json missing)" in text
