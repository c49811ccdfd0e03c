"""First contact and the CLI's success paths: ``mcm --help`` names every command; ``mcm fit`` before the data
exist ends in one line naming the missing shards and the command that makes them, before any run directory or
wandb run exists; ``mcm export`` writes the EMA weights and the recorded strength; ``mcm demo`` writes a
labelled, upscaled grid whose tiles are the pipeline's samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcm.cli import main
from mcm.cli.lightning_cli import run_lightning_cli
from mcm.training.mcm_module import MCMModule

REPO = Path(__file__).resolve().parents[1]
MULTIMODAL = REPO / "experiments" / "shapes32" / "multimodal.yaml"
SEG = {"segmentation": {"num_classes": 6}}
PAD = 2


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "data", "export", "demo", "evaluate", "sample"):
        assert f"    {cmd}" in out, f"`mcm --help` does not list {cmd}:\n{out}"
    assert "mcm fit -c experiments/X.yaml" in out


def test_fit_before_the_data_exist_is_one_line_and_creates_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mcm.cli", "fit", "-c", str(MULTIMODAL)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().split("\n") if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1] == ("mcm: error: data.init_args.train_shards: 1 of 1 shards do not exist: "
                         "['data/shapes/train-*.tar']; make them with "
                         "`mcm data shapes --out data/shapes --train 2000 --val 200`"), lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run directory, no wandb run before the data exist"


@pytest.mark.parametrize("command,missing", [("validate", "val_shards"), ("test", "val_shards"),
                                             ("predict", "val_shards")])
def test_evaluation_commands_name_the_split_they_miss(tmp_path, monkeypatch, command, missing):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mcm"])
    (tmp_path / "data" / "shapes").mkdir(parents=True)  # training shards exist, the validation split does not
    (tmp_path / "data" / "shapes" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        run_lightning_cli([command, "-c", str(MULTIMODAL)])
    msg = str(exit_.value.code)
    assert f"data.init_args.{missing}: 1 of 1 shards do not exist: ['data/shapes/val-*.tar']" in msg, msg
    assert "mcm data shapes --out data/shapes" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_pixel_base_dir):
    """A segmentation MCMModule checkpoint (EMA on, a few EMA steps so EMA and live weights differ)."""
    torch.manual_seed(0)
    module = MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, block_out_channels=(16, 32),
                       layers_per_block=1, attention_levels=(), ema_decay=0.9)
    with torch.no_grad():
        for _ in range(3):
            for p in module.mcm.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            module.ema.step(module.mcm.parameters())
    ckpt = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save(ckpt, path)
    return path, [s.clone() for s in module.ema.shadow_params], [p.detach().clone() for p in module.mcm.parameters()]


def test_export_through_the_cli(checkpoint, tmp_path):
    from mcm.pipelines import MCMPipeline

    path, shadow, live = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(path), str(tmp_path / "ema"), "--strength", "1.5"])
    assert exit_.value.code == 0
    cfg = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert cfg["default_strength"] == 1.5 and cfg["modalities"] == SEG
    info = json.loads((tmp_path / "ema" / "mcm_base.json").read_text())
    assert info["global_step"] == 3 and info["adapter"] == "mcm"
    module = MCMPipeline.from_pretrained(tmp_path / "ema").modules[0]
    assert module.default_strength == 1.5
    assert all(torch.equal(p, s) for p, s in zip(module.parameters(), shadow)), "the export holds the EMA weights"
    with pytest.raises(SystemExit):
        main(["export", str(path), str(tmp_path / "raw"), "--no-ema"])
    raw = MCMPipeline.from_pretrained(tmp_path / "raw").modules[0]
    assert all(torch.equal(p, w) for p, w in zip(raw.parameters(), live)) and raw.default_strength == 1.0


def _tile(grid: np.ndarray, row: int, col: int, cols: int, size: int, scale: int) -> np.ndarray:
    t = size * scale
    left = grid.shape[1] - (cols * (t + PAD) + PAD)
    y, x = PAD + row * (t + PAD), left + PAD + col * (t + PAD)
    return grid[y:y + t:scale, x:x + t:scale]


def _as_png_pixels(images: torch.Tensor) -> np.ndarray:
    """``(B,3,H,W)`` in [0, 1] quantised as the grid writer does."""
    return images.clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("model", ["shapes32", "export"])
def test_demo_through_the_cli(checkpoint, tmp_path, model):
    """The shipped shapes32 module (what a new user runs first) and an exported one: a labelled grid with
    128 px tiles whose base and MCM rows are the pipeline's samples for the same seeds."""
    from mcm.cli.demo import shapes_conditions
    from mcm.pipelines import MCMPipeline

    if model == "export":
        with pytest.raises(SystemExit):
            main(["export", str(checkpoint[0]), str(tmp_path / "m")])
        model = str(tmp_path / "m")
    out = tmp_path / "demo.png"
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(out), "--n", "2", "--steps", "2", "--model", model])
    assert exit_.value.code == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    pipe = MCMPipeline.from_pretrained(model)
    module = pipe.modules[0]
    size = pipe.base.sample_size[0]  # 32 for shapes32, 16 for the tiny base of the export
    conds, captions = shapes_conditions(2, size=size)
    conds = {k: v for k, v in conds.items() if k in module.modality_names}
    prompts = captions if pipe.base.is_text_conditional else None
    kw = dict(prompt=prompts, num_inference_steps=2, seeds=[0, 1], guidance_scale=1.0)
    mcm, base = pipe(conditions=conds, **kw, output_type="pt").images, pipe(conditions={}, num_images=2, **kw, output_type="pt").images
    rows, scale = len(conds) + 2, 128 // size  # tiles blown up to 128 px
    assert grid.shape[0] == rows * (128 + PAD) + PAD, grid.shape
    for col in range(2):
        assert np.array_equal(_tile(grid, rows - 2, col, 2, size, scale), _as_png_pixels(base)[col])
        assert np.array_equal(_tile(grid, rows - 1, col, 2, size, scale), _as_png_pixels(mcm)[col])
    assert not np.array_equal(_as_png_pixels(base), _as_png_pixels(mcm)), "the module changes the samples"
    left = grid.shape[1] - (2 * (128 + PAD) + PAD)
    assert left > 40 and all((grid[PAD + r * (128 + PAD):(r + 1) * (128 + PAD), :left] < 100).any()
                             for r in range(rows)), "every row has a label"
