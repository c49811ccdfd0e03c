"""The experiment template of every base family (issue: base families) trains for two steps through
``mcm fit`` on the family's tiny random directory, with only the base path, the data and the sizes
overridden; the checkpoint holds the MCM and a reference to the base, never the base."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from datamodules.shapes import write_shapes_shards
from mcm.cli import main as mcm

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("template,family,cached", [("sd21", "sd", False), ("sdxl", "sdxl", False), ("sd3", "sd3", False),
                                                   ("dit", "dit", False), ("sd3", "sd3", True), ("sdxl", "sdxl", True),
                                                   ("pixart_sigma", "pixart_sigma", False),
                                                   ("pixart_sigma", "pixart_sigma", True), ("flux", "flux", False),
                                                   ("flux", "flux", True), ("flux2", "flux2", True),
                                                   ("qwenimage", "qwenimage", False),
                                                   ("qwenimage", "qwenimage", True), ("sana", "sana", False),
                                                   ("sana", "sana", True), ("zimage", "zimage", False),
                                                   ("zimage", "zimage", True)])
def test_template_trains_two_steps(template, family, cached, tmp_path, monkeypatch, request):
    """``cached``: from ``mcm data encode --predictions 2`` shards, the base never run in the step (regression:
    every SD3 step on such shards was refused, its flow timesteps truncated)."""
    base_dir = request.getfixturevalue({"sd": "tiny_sd_dir"}.get(family, f"tiny_{family}_dir"))
    size = {"sd": 64, "flux": 32, "flux2": 32, "qwenimage": 32, "zimage": 32}.get(family, 16)  # 8 x the VAE: x8 SD, x4 Qwen, x2 the others
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["mcm"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    shards = tmp_path / "shapes"
    write_shapes_shards(shards, train=8, val=4, size=size, shard_size=8, workers=1)
    if cached:
        with pytest.raises(SystemExit) as done:
            mcm(["data", "encode", "--base", str(base_dir), str(shards / "train-*.tar"), str(shards / "val-*.tar"),
                 "--out", str(tmp_path / "enc"), "--predictions", "2", "--batch-size", "4", "--image-size", str(size)])
        assert done.value.code == 0
        shards = tmp_path / "enc"
    template_fit(template, base_dir, shards, size)
    metrics = next(Path("runs/t").rglob("metrics.csv"))
    with open(metrics) as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    ckpt = torch.load(next(Path(".").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["mcm_base"]["source"] == str(base_dir)
    assert all(k.startswith("mcm.") for k in ckpt["state_dict"])


def template_fit(template: str, base_dir: Path, shards: Path, size: int, *extra: str) -> None:
    """``mcm fit`` of an experiment template for 2 steps on a tiny base (CSV logs under ``runs/t``)."""
    mcm(["fit", "-c", str(REPO / "experiments" / "templates" / f"{template}.yaml"),
         "--model.init_args.base", str(base_dir), "--model.init_args.base_dtype", "null",
         "--model.init_args.block_out_channels", "[8, 16]", "--model.init_args.layers_per_block", "1",
         "--model.init_args.attention_levels", "[]", "--model.init_args.val_sample_steps", "2",
         "--model.init_args.num_val_samples", "2", "--model.init_args.warmup_steps", "0",
         "--data.init_args.modalities", "{segmentation: {num_classes: 6}}",
         "--data.init_args.train_shards", str(shards / "train-*.tar"),
         "--data.init_args.val_shards", str(shards / "val-*.tar"),
         "--data.init_args.image_size", str(size), "--data.init_args.batch_size", "2",
         "--data.init_args.num_workers", "0", "--data.init_args.hflip", "0.0",
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs/t", *extra])
