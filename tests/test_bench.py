"""The benchmark scripts run on tiny models and write well-formed JSON (no timing assertions).

Benchmarks are scripts (docs/performance.md); these tests only guard that they keep running
as the code they measure changes, and that the JSON carries the keys the docs and issue 7 name.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # steps run without a Trainer

TRAIN_KEYS = {"mcm_step_over_base_forward", "controlnet_step_over_mcm_step", "finetune_step_over_base_forward",
              "mcm_peak_mem_over_base_inference", "mcm_params_over_base", "allreduce_bytes_mcm",
              "allreduce_bytes_controlnet"}
SAMPLE_KEYS = {"mcm_sampling_overhead", "controlnet_sampling_overhead", "compose2_sampling_overhead",
               "strength_map_over_mcm", "regions_over_compose2"}


def _finite_numbers(d: dict, keys: set[str]) -> None:
    missing = keys - set(d)
    assert not missing, f"missing keys {sorted(missing)}"
    for k in keys:
        assert isinstance(d[k], (int, float)) and math.isfinite(d[k]), (k, d[k])


def test_train_step_json(tmp_path):
    from bench import train_step

    out = tmp_path / "train.json"
    train_step.main(["--tiny", "--reps", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res) == {"shapes32", "sd15"}
    for name, r in res.items():
        _finite_numbers(r, TRAIN_KEYS)
        assert r["allreduce_bytes_mcm"] == 4 * r["params"]["mcm"]
        assert 0 < r["mcm_params_over_base"] < 1, name  # the MCM is smaller than the base it modulates
        assert r["peak_mem_bytes"]["base_inference"] > 0


def test_sample_json(tmp_path):
    from bench import sample

    out = tmp_path / "sample.json"
    sample.main(["--tiny", "--reps", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res) == {"shapes32", "sd15"}
    for r in res.values():
        _finite_numbers(r, SAMPLE_KEYS)


def test_data_json(tmp_path):
    from bench import data

    out = tmp_path / "data.json"
    data.main(["--tiny", "--batch", "8", "--samples", "32", "--workers", "0,1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["loader"]) == {"0", "1"}
    assert res["mcm_train_samples_per_s"] > 0 and all(v["samples_per_s"] > 0 for v in res["loader"].values())


@pytest.mark.parametrize("script", ["train_step", "sample", "data", "scaling"])
def test_scripts_have_help(script, capsys):
    module = __import__(f"bench.{script}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_families_json(tmp_path):
    """bench/families.py runs on tiny SDXL / SD3 architectures and reports every ratio it promises."""
    from bench import families

    out = tmp_path / "families.json"
    families.main(["--tiny", "--latent", "8", "--reps", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res) == {"sdxl", "sd3"}
    _finite_numbers(res["sdxl"], {"mcm_step_over_base_forward", "mcm_peak_mem_over_base_inference",
                                  "controlnet_step_over_mcm_step"})
    _finite_numbers(res["sd3"], {"mcm_step_over_base_forward", "mcm_peak_mem_over_base_inference",
                                 "controlnet_step_over_mcm_step"})  # SD3's own ControlNet class
    assert res["sdxl"]["controlnet_params"] > 0 and res["sdxl"]["mcm_params"] > 0


def test_families_base_free_rows(tmp_path):
    """FLUX.1 and Qwen-Image (tiny widths here) with ``--base-free``: the step from cached predictions runs in its
    own process with the denoiser never loaded, and its time and peak memory are reported next to the base's."""
    from bench import families

    out = tmp_path / "families.json"
    families.main(["--tiny", "--models", "flux,qwenimage", "--latent", "8", "--reps", "1", "--base-free",
                   "--json", str(out)])
    res = json.loads(out.read_text())
    for fam in ("flux", "qwenimage"):
        _finite_numbers(res[fam], {"mcm_step_over_base_forward", "mcm_peak_mem_over_base_inference",
                                   "base_free_step_over_base_forward", "base_free_peak_over_base_inference",
                                   "controlnet_step_over_mcm_step"})
        assert res[fam]["base_free"]["denoiser_loaded"] is False


def test_gpu_suite_runs_its_cpu_parts(tmp_path):
    """bench/gpu_suite.sh in its tiny mode on this CPU: the cuda tests are collected and skipped (none fails),
    both benches write their JSON and the GPU table names every ratio; docs/performance.md is left alone."""
    import os
    import subprocess
    import xml.etree.ElementTree as ET

    doc = (ROOT / "docs" / "performance.md").read_text()
    env = {**os.environ, "MCM_GPU_SUITE_TINY": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = ET.parse(tmp_path / "cuda_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 8 and int(suite.get("failures")) == int(suite.get("errors")) == 0
    if not torch.cuda.is_available():
        assert int(suite.get("skipped")) == int(suite.get("tests"))
    table = (tmp_path / "table.md").read_text()
    for row in ("MCM step / base forward", "ControlNet step / MCM step", "base-free MCM step",
                "peak memory: base inference / MCM step / ControlNet step"):
        assert row in table, row
    _finite_numbers(json.loads((tmp_path / "families_sdxl.json").read_text())["sdxl"],
                    {"mcm_step_over_base_forward", "controlnet_step_over_mcm_step"})
    assert (ROOT / "docs" / "performance.md").read_text() == doc
