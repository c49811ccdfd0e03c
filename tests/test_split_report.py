"""mcm.evaluation.split_report: the strength is chosen on val and the figure read on test at that strength."""
from __future__ import annotations

import json

import yaml

from mcm.evaluation.split_report import main


def _metrics(path, f1_by_strength, fid=0.1):
    path.mkdir(parents=True)
    settings = [{"modalities": ["sketch"], "strength": s, "metrics": {"sketch_f1": v, "fid_judge": fid}}
                for s, v in f1_by_strength.items()]
    (path / "metrics.json").write_text(json.dumps({"settings": settings}))


def test_test_figure_at_the_val_choice(tmp_path):
    _metrics(tmp_path / "val", {1.0: 0.5, 2.0: 0.7, 3.0: 0.6})
    _metrics(tmp_path / "test", {1.0: 0.55, 2.0: 0.65, 3.0: 0.9}, fid=0.25)  # test's own best (3) is not taken
    spec = {"metric": "sketch_f1", "modality": "sketch", "marker": "t", "budget": "b",
            "rows": [{"name": "a", "changed": "c", "command": "cmd", "run": "run", "val": "val", "test": "test"},
                     {"name": "b", "changed": "c", "command": "cmd", "run": "run", "val": "none", "test": "none"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- t -->\nold\n<!-- /t -->\nafter\n")
    main([str(tmp_path / "spec.yaml"), "--root", str(tmp_path), "--out", str(doc)])
    text = doc.read_text()
    assert text.startswith("before\n<!-- t -->\nb\n") and text.endswith("<!-- /t -->\nafter\n") and "old" not in text
    row = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert row == "| a | c | `cmd` | – | 1, 2, 3 | 2 | 0.700 | 0.650 | 0.250 |  |"
    assert "| b | c | `cmd` | not run |" in text


def test_pooled_directories_and_the_choice_at_the_baselines_realism(tmp_path):
    """Strengths from several evaluations of one export pool; with ``quality_of`` each row also gets its best val
    score among the strengths whose val judge-FID is at most the named row's at its own choice."""
    _metrics(tmp_path / "base_val", {1.0: 0.8, 2.0: 0.9}, fid=0.3)  # the baseline: 2 chosen, FID 0.3 -> the cap
    _metrics(tmp_path / "base_test", {1.0: 0.7, 2.0: 0.85}, fid=0.35)
    for split, low, high in (("val", 0.5, 0.8), ("test", 0.55, 0.75)):
        _metrics(tmp_path / f"m_{split}", {1.0: low}, fid=0.2)  # realistic, weak
        _metrics(tmp_path / f"m_{split}_more", {8.0: high}, fid=0.9)  # aligned, unrealistic
    spec = {"metric": "sketch_f1", "modality": "sketch", "marker": "t", "quality_of": "base",
            "rows": [{"name": "base", "changed": "c", "command": "cmd", "run": "run", "val": "base_val",
                      "test": "base_test"},
                     {"name": "m", "changed": "c", "command": "cmd", "run": "run", "val": ["m_val", "m_val_more"],
                      "test": ["m_test", "m_test_more"]}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- t -->\n<!-- /t -->\n")
    main([str(tmp_path / "spec.yaml"), "--root", str(tmp_path), "--out", str(doc)])
    lines = doc.read_text().splitlines()
    assert "judge-FID <= base's (0.300)" in next(line for line in lines if line.startswith("| variant"))
    assert next(line for line in lines if line.startswith("| m |")) == \
        "| m | c | `cmd` | – | 1, 8 | 8 | 0.800 | 0.750 | 0.900 | 1 | 0.550 | 0.200 |  |"
    assert next(line for line in lines if line.startswith("| base |")) == \
        "| base | c | `cmd` | – | 1, 2 | 2 | 0.900 | 0.850 | 0.350 | 2 | 0.850 | 0.350 |  |"
