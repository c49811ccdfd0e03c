"""The alignment callback (issue #17, item 4): alignment scalars logged while training.

1. A tiny ``mcm fit`` of the multimodal experiment (2 validations) logs every ``align/*`` scalar in the
   offline wandb run at the validation steps; a second instance with ``every_n_validations=2`` logs at the
   second validation only; the logged values equal what ``mcm evaluate`` computes for an export of the
   checkpoint of that step, on the same maps, seeds and steps.
2. The plot command reads the run back and writes one panel per scalar plus the loss.
3. A base without shipped judges: one warning, only ``sketch_f1`` (per-modality keys named as documented).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from datamodules.shapes import write_shapes_shards
from mcm.evaluation.wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parents[1]
MULTIMODAL = REPO / "experiments" / "shapes32" / "multimodal.yaml"
RUN = Path("runs/shapes32_multimodal")
KEYS = ("seg_miou", "partial_miou", "sketch_f1", "depth_delta1", "depth_ssi_rmse", "fid_judge")
JUDGES = {"seg_judge": "shapes32-segmentation", "depth_judge": "shapes32-depth"}
N, STEPS, STRENGTH = 4, 2, 1.5  # held-out maps, DDIM steps; multimodal.yaml's val_strength


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes16")
    write_shapes_shards(out, train=16, val=8, size=16, shard_size=8, workers=1)
    return out


def callback(**init_args) -> dict:
    return {"class_path": "mcm.cli.alignment_callback.AlignmentCallback",
            "init_args": {"num_samples": N, "steps": STEPS, "batch_size": 2, "grid_samples": 2, "judges": JUDGES,
                          **init_args}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, shards, tiny_pixel_base_dir) -> Path:
    """4 steps of the multimodal experiment, validation at steps 2 and 4, a checkpoint at each."""
    import wandb

    from mcm.cli import main

    root = tmp_path_factory.mktemp("fit")
    cfg = {
        "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "max_time": None,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": f"{RUN}/checkpoints", "filename": "{step}",
                                                 "every_n_train_steps": 2, "save_top_k": -1}},
                                  callback(), callback(every_n_validations=2, prefix="align_every2")]},
        "model": {"init_args": {"base": str(tiny_pixel_base_dir), "block_out_channels": [16, 32],
                                "attention_levels": [1], "val_sample_steps": 2, "num_val_samples": 2}},
        "data": {"init_args": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                               "image_size": 16, "batch_size": 4, "num_workers": 0, "limit_train_samples": None}},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / "wandb_home"))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.chdir(root)
        mp.setattr("sys.argv", ["mcm"])
        try:
            main(["fit", "-c", str(MULTIMODAL), "-c", str(root / "tiny.yaml")])
        finally:
            wandb.finish()
            # and stop wandb's service: it resolves the next run's relative save_dir against the cwd it was
            # started in, so a later in-process fit from another directory would write its run there
            wandb.teardown()
    return root


def logged(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["trainer/global_step"], row[key]) for row in history if key in row]


# ---- 1. scalars at the right steps, equal to mcm evaluate's ---------------------------------------------
def test_align_scalars_logged_at_validations_and_equal_mcm_evaluate(fitted, shards, tmp_path):
    from mcm.cli.tool_commands import run_tool_command

    (run,) = sorted((fitted / RUN / "wandb").glob("offline-run-*"))
    history, _ = read_offline_run(run, timeout=60.0)
    # Lightning logs a validation after optimizer step k at logger step k - 1, as the train/loss of step k
    val_steps = [s for s, _ in logged(history, "val/loss")]
    assert val_steps == [1, 3]
    for key in KEYS:
        assert [s for s, _ in logged(history, f"align/{key}")] == val_steps, key
        assert [s for s, _ in logged(history, f"align_every2/{key}")] == [3], f"every 2nd validation: {key}"
    assert all("val/loss" in row for row in history if "align/seg_miou" in row), "one row with the loss"
    # the N-th validation of both instances measures the same thing
    for key in KEYS:
        assert logged(history, f"align_every2/{key}")[0][1] == logged(history, f"align/{key}")[1][1]
    grids = sorted(p.name for p in (fitted / RUN / "samples").glob("align_samples_*.png"))
    assert grids == ["align_samples_step000002.png", "align_samples_step000004.png"]

    for step, log_step in ((2, 1), (4, 3)):
        (ckpt,) = (fitted / RUN / "checkpoints").glob(f"step={step}*.ckpt")
        export = tmp_path / f"export{step}"
        assert run_tool_command(["export", str(ckpt), str(export)]) == 0
        out = tmp_path / f"eval{step}"
        assert run_tool_command(["evaluate", "--mcm", str(export), "--data", str(shards / "val-*.tar"),
                                 "--n", str(N), "--seeds", "0", "--steps", str(STEPS), "--strength", str(STRENGTH),
                                 "--batch-size", "2", "--threads", "1", "--out", str(out),
                                 # the experiment's judges (a tiny base other than shapes32 ships none)
                                 "--seg-judge", "shapes32-segmentation", "--depth-judge", "shapes32-depth"]) == 0
        (setting,) = json.loads((out / "metrics.json").read_text())["settings"]
        assert setting["strength"] == STRENGTH and len(setting["modalities"]) == 4
        for key in KEYS:
            value = dict(logged(history, f"align/{key}"))[log_step]
            assert setting["metrics"][key] is not None, key
            # FID's matrix square root amplifies the float32 rounding of features computed with another thread
            # count (the fit's default threads, evaluate's --threads 1): 1e-5 relative seen, 1e-4 allowed; the
            # sketch F1 counts Canny edge pixels, and that rounding (the MCM also reads the base's features since
            # the main job sets base_features) can move one edge pixel of the 4 maps: 7e-4 seen, 2e-3 allowed
            tol = dict(rel=1e-4) if key == "fid_judge" else dict(abs=2e-3) if key == "sketch_f1" else dict(abs=1e-6)
            assert value == pytest.approx(setting["metrics"][key], **tol), (step, key)


# ---- 2. the plot command -----------------------------------------------------------------------------------
def test_alignment_plot_writes_png_from_run_dir(fitted, tmp_path):
    from mcm.evaluation import alignment_plot

    history, _ = read_offline_run(fitted / RUN / "wandb" / "latest-run")
    series = alignment_plot.curves(history)
    assert series["align/seg_miou"] == [(s, float(v)) for s, v in logged(history, "align/seg_miou")]
    assert [s for s, _ in series["train/loss"]] == [0, 1, 2, 3] and [s for s, _ in series["val/loss"]] == [1, 3]
    assert not any(k.startswith("align/samples") for k in series), "images are not curves"
    png = tmp_path / "img" / "alignment_curve.png"
    assert alignment_plot.main([str(fitted / RUN), "--out", str(png)]) == 0
    panels = len([k for k in series if k.startswith("align/")]) + 1  # + the loss
    cols, rows = 3, -(-panels // 3)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (round(4.2 * cols * 120), round(3.2 * rows * 120))
    with pytest.raises(ValueError, match="no 'nothing/\\*' scalars"):
        alignment_plot.plot(series, tmp_path / "x.png", prefix="nothing")
    # the base-alone and real-image lines come from an `mcm evaluate` report of the base alone
    refs = alignment_plot.reference_lines(REPO / "docs" / "eval" / "base" / "metrics.json")
    assert refs["seg_miou"] == {"base alone": 0.196125, "real images": 0.962041}
    assert alignment_plot.main([str(fitted / RUN), "--out", str(png), "--reference",
                                str(REPO / "docs" / "eval" / "base" / "metrics.json")]) == 0


# ---- 3. no judge for this base ------------------------------------------------------------------------------
def test_without_judges_warns_once_and_logs_sketch_f1_only(shards, tiny_pixel_base_dir, caplog):
    from mcm import MCMModule
    from mcm.cli.alignment_callback import AlignmentCallback
    from mcm.evaluation import evaluate as E

    mods = {"segmentation": {"num_classes": 6}, "sketch": {}}
    torch.manual_seed(0)
    module = MCMModule(base=str(tiny_pixel_base_dir), modalities=mods, block_out_channels=[8, 16],
                       attention_levels=[], ema_decay=None)
    data = E.load_data(str(shards / "val-*.tar"), mods, 16, 2)
    cb = AlignmentCallback(num_samples=2, steps=1, per_modality=True, strength=1.0)
    with caplog.at_level(logging.WARNING, logger="mcm.cli.alignment_callback"):
        first, images, labels = cb.measure(module, data)
        again, _, _ = cb.measure(module, data)
    warnings = [r for r in caplog.records if "no judge is available" in r.getMessage()]
    assert len(warnings) == 1 and str(tiny_pixel_base_dir) in warnings[0].getMessage()
    # settings: segmentation alone, sketch alone, both (mcm evaluate --per-modality order)
    assert sorted(first) == ["align/sketch_f1", "align/sketch_f1/sketch_alone"]
    assert first == again, "fixed seeds: the same weights score the same"
    assert len(images) == 3 and labels[-1] == "MCM: all, strength 1"
    # the value is mcm evaluate's score of the same samples
    a = cb.options(module)
    setting = {"modalities": ["segmentation", "sketch"], "strength": 1.0}
    from mcm.pipelines import MCMPipeline

    samples = E.generate(MCMPipeline.from_base(module.base, [module.trainable]), data, setting, a,
                         type("P", (), {"update": lambda self, n: None})())
    judges = {"segmentation": None, "depth": None, "features": None}
    expected = E.score(samples, data, setting, {"segmentation": mods["segmentation"], "sketch": {}}, judges, {}, a)
    assert first["align/sketch_f1"] == expected["sketch_f1"]
    assert torch.equal(images[-1], samples[0])


def test_bad_arguments_are_named():
    from mcm.cli.alignment_callback import AlignmentCallback

    with pytest.raises(ValueError, match=r"every_n_validations=0"):
        AlignmentCallback(every_n_validations=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['segmentation'\]"):
        AlignmentCallback(judges={"segmentation": "x"})


def test_validation_count_is_checkpointed_per_instance():
    """A resumed run keeps counting validations, so every_n_validations skips the same runs as without a stop."""
    from mcm.cli.alignment_callback import AlignmentCallback

    a, b = AlignmentCallback(every_n_validations=2), AlignmentCallback(every_n_validations=2, prefix="other")
    assert a.state_key != b.state_key
    a.validations = 3
    resumed = AlignmentCallback(every_n_validations=2)
    resumed.load_state_dict(a.state_dict())
    assert resumed.validations == 3 and resumed.state_key == a.state_key
