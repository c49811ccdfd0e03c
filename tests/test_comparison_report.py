"""`python -m mcm.evaluation.comparison_report`: every cell comes from the files the spec names."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mcm.evaluation import comparison_report as R


def _metrics(settings: list[tuple[list[str], dict]]) -> dict:
    return {"settings": [{"mcm": [], "weights": [], "modalities": m, "strength": 1.0, "metrics": v}
                         for m, v in settings],
            "reference": {"modalities": ["segmentation"], "metrics": {"seg_miou": 0.97}}}


@pytest.fixture
def spec_dir(tmp_path):
    (tmp_path / "ev_base").mkdir()
    (tmp_path / "ev_base" / "metrics.json").write_text(json.dumps(_metrics([(["segmentation"], {"seg_miou": 0.11})])))
    (tmp_path / "ev_mm").mkdir()
    (tmp_path / "ev_mm" / "metrics.json").write_text(json.dumps(_metrics([
        (["segmentation"], {"seg_miou": 0.61, "fid_judge": 3.5}), (["sketch"], {"sketch_f1": 0.42})])))
    (tmp_path / "mod").mkdir()
    save_file({"a": torch.zeros(10, 3), "b": torch.zeros(5)}, str(tmp_path / "mod" / "mcm.safetensors"))
    bench = {"shapes32": {"mcm_step_over_base_forward": 2.5, "mcm_peak_mem_over_base_inference": 1.5}}
    (tmp_path / "train.json").write_text(json.dumps(bench))
    (tmp_path / "sample.json").write_text(json.dumps({"shapes32": {"mcm_sampling_overhead": 0.25}}))
    spec = {"bench": {"model": "shapes32", "train_step": "train.json", "sample": "sample.json"},
            "rows": [{"label": "base alone", "method": "base", "eval": "ev_base", "reference": True},
                     {"label": "MCM", "method": "mcm", "eval": "ev_mm", "modules": "mod", "steps": 600,
                      "settings": [["sketch"]]}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_table_reads_metrics_params_and_bench_ratios(spec_dir):
    text = R.main([str(spec_dir / "spec.yaml"), "--root", str(spec_dir), "--out", str(spec_dir / "t.md")])
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 3, lines  # header, base, reference, the one MCM setting kept by the filter
    base, ref, mcm = lines[1:]
    assert "0.110" in base and "| 0 |" in base and "| 1.00 |" in base  # no trainable params, sampling = base
    assert ref.startswith("| *real held-out images*") and "0.970" in ref
    assert "| 35 |" in mcm and "| 600 |" in mcm and "| 2.50 |" in mcm and "| 1.50 |" in mcm and "| 1.25 |" in mcm
    assert "0.420" in mcm and "0.610" not in mcm  # the segmentation setting was filtered out
    assert (spec_dir / "t.md").read_text() == text


def test_bad_method_and_missing_export_are_named(spec_dir):
    spec = yaml.safe_load((spec_dir / "spec.yaml").read_text())
    spec["rows"][1]["method"] = "lora"
    with pytest.raises(ValueError, match="method 'lora'"):
        R.build_rows(spec, spec_dir)
    spec["rows"][1].update(method="mcm", modules="nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere: no .safetensors"):
        R.build_rows(spec, spec_dir)
