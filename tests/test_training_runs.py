"""Real `mcm fit|predict` runs through LightningCLI on tiny bases and shards (issue 4, items 4-6).

1. wandb offline: scalars, config and a sample grid are found in the offline run directory.
2. The Stable Diffusion template trains on the tiny SD directory; checkpoints hold only the MCM.
3. `mcm predict` writes per-sample PNGs and grids (condition rows | base | MCM).
4. DDP on CPU (gloo, 2 processes): identical MCM weights on both ranks, the base never in
   DDP's reducer, the same number of batches on every rank from uneven shards.

Every run uses the experiment YAML itself plus a small overlay, with cwd = tmp_path so the
experiments' relative ``runs/...`` paths land there.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from datamodules.shapes import write_shapes_shards
from mcm.models.frozen_base import FrozenBase
from mcm.evaluation.wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MULTIMODAL = REPO / "experiments" / "shapes32" / "multimodal.yaml"
SD_TEMPLATE = REPO / "experiments" / "templates" / "sd15.yaml"
RUN = Path("runs/shapes32_multimodal")  # the experiment's save_dir / checkpoint / predict paths, under cwd
N_MODALITIES = 4  # segmentation, sketch, depth, partial_mask
PAD = 2  # grids.grid_image padding
SCALE = 8  # labelled grids blow 16 px tiles up to 128 px (grids.MIN_TILE), nearest


# ---- helpers ---------------------------------------------------------------------------------------
def shard_keys(pattern: str) -> list[str]:
    keys = set()
    for shard in glob.glob(pattern):
        with tarfile.open(shard) as tf:
            keys |= {m.name.split(".", 1)[0] for m in tf if m.isfile()}
    return sorted(keys)


def tile(grid: np.ndarray, row: int, col: int, size: int, cols: int) -> np.ndarray:
    """The ``size`` px image at (row, col) of a labelled grid (label column left, tiles blown up x SCALE)."""
    t = size * SCALE
    left = grid.shape[1] - (cols * (t + PAD) + PAD)  # the label column's width
    y, x = PAD + row * (t + PAD), left + PAD + col * (t + PAD)
    return grid[y:y + t:SCALE, x:x + t:SCALE]


def check_labelled_grid(grid: np.ndarray, rows: int, cols: int, size: int = 16) -> None:
    """Tiles >= 128 px with a label column holding dark text in every row."""
    t = size * SCALE
    assert t >= 128 and grid.shape[0] == rows * (t + PAD) + PAD, grid.shape
    left = grid.shape[1] - (cols * (t + PAD) + PAD)
    assert left > 40, f"no label column ({left} px)"
    for r in range(rows):
        band = grid[PAD + r * (t + PAD):PAD + r * (t + PAD) + t, :left]
        assert (band < 100).any(), f"row {r} has no label"
    assert (grid[:, :left] == 255).mean() > 0.8, "the label column is white with black text"


def base_bytes(directory: Path) -> dict[str, str]:
    """sha256 of every file of a base directory."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def mcm_numel(state_dict: dict) -> int:
    return sum(v.numel() for k, v in state_dict.items() if k.startswith("mcm."))


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path, monkeypatch):
    """Keep wandb's cache/config/artifact directories in tmp, never in $HOME."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # wandb's stdout wrapping would swallow pytest's own output


def mcm(argv: list[str]) -> None:
    """``mcm ...`` in this process; closes the wandb run it opened so its files are complete."""
    import wandb

    from mcm.cli import main

    try:
        main(argv)
    finally:
        wandb.finish()
        # and stop wandb's service: it resolves the next run's relative save_dir against the cwd it was
        # started in, so a later in-process fit from another directory would write its run there
        wandb.teardown()


def overlay(path: Path, shards: Path, size: int = 16, **trainer) -> Path:
    """The tiny settings over ``experiments/shapes32/multimodal.yaml``: 16x16 shards, a 2-level MCM, 3 steps."""
    cfg = {
        "trainer": {"max_steps": 3, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "max_time": None, **trainer},
        "model": {"init_args": {"block_out_channels": [16, 32], "attention_levels": [1], "val_sample_steps": 2,
                                "num_val_samples": 2}},
        "data": {"init_args": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                               "image_size": size, "batch_size": 4, "num_workers": 0, "limit_train_samples": None}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def shards16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes16")
    write_shapes_shards(out, train=32, val=8, size=16, shard_size=8, workers=1)
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, shards16, tiny_pixel_base_dir) -> dict:
    """One short `mcm fit` of the multimodal experiment with its WandbLogger (offline)."""
    root = tmp_path_factory.mktemp("fit")
    config = overlay(root / "tiny.yaml", shards16)
    argv = ["-c", str(MULTIMODAL), "-c", str(config), "--model.init_args.base", str(tiny_pixel_base_dir)]
    before = base_bytes(tiny_pixel_base_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr("sys.argv", ["mcm"])  # LightningCLI takes its arguments from args= only
        mcm(["fit", *argv])
    return {"root": root, "argv": argv, "ckpt": root / RUN / "checkpoints" / "last.ckpt",
            "wandb_runs": sorted((root / RUN / "wandb").glob("offline-run-*")),
            "base_before": before, "base_after": base_bytes(tiny_pixel_base_dir)}


# ---- 1. wandb offline ------------------------------------------------------------------------------
def test_fit_logs_scalars_config_and_images_to_offline_wandb(fitted, tiny_pixel_base_dir):
    root = fitted["root"]
    runs = fitted["wandb_runs"]
    assert len(runs) == 1, f"expected one offline run, found {runs}"
    run = runs[0]
    history, config = read_offline_run(run, timeout=60.0)
    ckpt = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert fitted["base_before"] and fitted["base_after"] == fitted["base_before"], "the frozen base's files changed"

    # scalars: loss every step, validation once (step 2), learning rate, parameter counts
    logged = lambda key: [row[key] for row in history if key in row]  # noqa: E731
    train_loss, val_loss = logged("train/loss"), logged("val/loss")
    assert len(train_loss) == 3 and all(math.isfinite(v) for v in train_loss), train_loss
    assert len(val_loss) == 1 and math.isfinite(val_loss[0]), val_loss
    assert logged("val/base_loss"), "the no-op reference loss is missing"
    lrs = logged("lr-AdamW")
    # diffusers' get_constant_schedule_with_warmup: lr * step / warmup_steps, from 0
    assert len(lrs) == 3 and lrs[0] == 0 and 0 < lrs[1] < 5e-4 and lrs[2] == pytest.approx(2 * lrs[1]), \
        f"warm-up learning rates: {lrs}"
    n_mcm, n_base = logged("params/mcm"), logged("params/base")
    assert n_mcm == [mcm_numel(ckpt["state_dict"])], "params/mcm must count exactly the checkpointed MCM"
    assert n_base == [sum(p.numel() for p in FrozenBase.from_pretrained(tiny_pixel_base_dir).frozen_parameters())]
    assert logged("params/ratio") == [pytest.approx(n_mcm[0] / n_base[0])]

    # the sample grid: a wandb image whose file is in the run, conditions | base | MCM for 2 samples
    images = [row for row in history if row.get("val/samples/_type") == "images/separated"]
    assert len(images) == 1, "one validation pass, one logged grid"
    (name,) = images[0]["val/samples/filenames"]
    png = run / "files" / name
    assert png.is_file(), f"{png} was logged but not written"
    rows, cols = N_MODALITIES + 2, 2
    on_disk = root / RUN / "samples" / "val_samples_step000002.png"
    assert on_disk.is_file(), "the grid is also kept next to the run"
    logged = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(logged, np.asarray(Image.open(on_disk).convert("RGB"))), "wandb and disk: one picture"
    check_labelled_grid(logged, rows, cols)

    # config: module and data hyperparameters, the trainer settings and the parameter counts
    assert config["base"] == str(tiny_pixel_base_dir) and config["block_out_channels"] == [16, 32]
    assert config["batch_size"] == 4 and config["image_size"] == 16
    assert set(config["modalities"]) == {"segmentation", "sketch", "depth", "partial_mask"}
    assert config["trainer"]["max_steps"] == 3 and config["seed_everything"] == 0
    assert config["params"]["mcm"] == n_mcm[0]

    # LightningCLI's resolved config: next to the run (log_dir) and inside the wandb run
    for saved in (root / RUN / "config.yaml", run / "files" / "lightning_config.yaml"):
        cfg = yaml.safe_load(saved.read_text())
        assert cfg["trainer"]["max_steps"] == 3 and cfg["model"]["init_args"]["base"] == str(tiny_pixel_base_dir)
        assert cfg["model"]["init_args"]["modalities"] == cfg["data"]["init_args"]["modalities"], \
            "the saved config must hold resolved values, not ${...} interpolations"


# ---- 2. the Stable Diffusion template on the tiny SD directory -------------------------------------
def test_sd15_template_trains_and_checkpoints_only_the_mcm(tmp_path, monkeypatch, tiny_sd_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["mcm"])
    shards = tmp_path / "shapes64"
    write_shapes_shards(shards, train=8, val=4, size=64, shard_size=8, workers=1)  # 64 px -> 8x8 latents
    mcm(["fit", "-c", str(SD_TEMPLATE),
         "--model.init_args.base", str(tiny_sd_dir), "--model.init_args.base_dtype", "bfloat16",
         "--model.init_args.block_out_channels", "[8, 16]", "--model.init_args.layers_per_block", "1",
         "--model.init_args.attention_levels", "[]", "--model.init_args.val_sample_steps", "2",
         "--model.init_args.num_val_samples", "2",
         # overriding the data's modalities must reach the model too (`${data.init_args.modalities}`)
         "--data.init_args.modalities.segmentation.num_classes", "6",
         "--data.init_args.train_shards", str(shards / "train-*.tar"),
         "--data.init_args.val_shards", str(shards / "val-*.tar"),
         "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs/sd15_mcm"])

    with open(tmp_path / "runs/sd15_mcm/sd15_mcm/version_0/metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses

    ckpt_path = tmp_path / "runs/sd15_mcm/checkpoints/last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    sd = ckpt["state_dict"]
    assert sd and all(k.startswith("mcm.") for k in sd), sorted({k.split(".")[0] for k in sd})
    assert all(v.dtype == torch.float32 for v in sd.values()), "the MCM trains in fp32 while the base runs in bf16"
    base = FrozenBase.from_pretrained(tiny_sd_dir)
    n_base = sum(p.numel() for p in base.frozen_parameters())
    assert mcm_numel(sd) < n_base / 4
    assert ckpt_path.stat().st_size < 4 * n_base, "the checkpoint must not contain the base's weights"
    # regression: the hash was taken after the bf16 cast, so this checkpoint refused the same base in fp32
    assert ckpt["mcm_base"] == {"source": str(tiny_sd_dir), "hash": base.content_hash()}
    assert ckpt["hyper_parameters"]["modalities"]["segmentation"] == {"num_classes": 6}
    seg_encoder = [v for k, v in sd.items() if k.startswith("mcm.encoders.segmentation.") and v.ndim == 4][0]
    assert seg_encoder.shape[1] == 6, "the segmentation encoder must take 6 one-hot channels"
    assert (tmp_path / "runs/sd15_mcm/samples/val_samples_step000002.png").is_file()


# ---- 3. mcm predict -----------------------------------------------------------------------------
def test_predict_writes_pngs_and_comparison_grids(fitted, shards16, monkeypatch):
    root = fitted["root"]
    monkeypatch.chdir(root)
    monkeypatch.setattr("sys.argv", ["mcm"])
    mcm(["predict", *fitted["argv"], "--ckpt_path", str(fitted["ckpt"])])

    out = root / RUN / "predict"
    keys = shard_keys(str(shards16 / "val-*.tar"))
    assert len(keys) == 8
    for k in keys:
        for kind in ("base", "mcm"):
            assert Image.open(out / f"{k}_{kind}.png").size == (16, 16)
    grids = sorted(out.glob("grid_*.png"))
    assert [g.name for g in grids] == ["grid_0_0000.png", "grid_0_0001.png"]  # 8 samples, batches of 4
    rows, n = N_MODALITIES + 2, 4
    base_pngs = {k: np.asarray(Image.open(out / f"{k}_base.png").convert("RGB")) for k in keys}
    mcm_pngs = {k: np.asarray(Image.open(out / f"{k}_mcm.png").convert("RGB")) for k in keys}
    for g in grids:
        grid = np.asarray(Image.open(g).convert("RGB"))
        check_labelled_grid(grid, rows, n)
        for col in range(n):
            # the last two rows are the per-sample PNGs of some key of this grid (blown up, pixels kept)
            found = [k for k in keys if np.array_equal(tile(grid, rows - 2, col, 16, n), base_pngs[k])
                     and np.array_equal(tile(grid, rows - 1, col, 16, n), mcm_pngs[k])]
            assert found, f"{g.name} column {col}: base/MCM rows do not match any written sample"
            for r in range(N_MODALITIES):  # condition visualisations, not blank tiles
                assert tile(grid, r, col, 16, n).std() > 0, f"{g.name}: condition row {r} column {col} is blank"


# ---- 4. DDP on CPU --------------------------------------------------------------------------------
def test_ddp_two_ranks_identical_weights_base_outside_reducer(tmp_path, tiny_pixel_base_dir, monkeypatch):
    shards = tmp_path / "uneven"
    # shards of 5, 5 and 2 samples: rank 0 reads 7, rank 1 reads 5; both must get 12 // (2 * 2) = 3 batches.
    # Validation: the same uneven layout (val-000000..2 of 5, 5, 2), read once after the last step.
    write_shapes_shards(shards, train=12, val=12, size=16, shard_size=5, workers=1)
    before = base_bytes(tiny_pixel_base_dir)
    config = overlay(tmp_path / "tiny.yaml", shards, max_epochs=1, limit_val_batches=None, val_check_interval=3)
    probe = tmp_path / "probe"
    path = [str(TESTS), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "OMP_NUM_THREADS": "1", "MCM_TEST_THREADS": "1", "WANDB_MODE": "offline",
           "MCM_ALLOW_CLASS_PREFIXES": "ddp_probe"}  # the probe callback is not in mcm's class allow-list
    cmd = [sys.executable, "-m", "mcm.cli", "fit", "-c", str(MULTIMODAL), "-c", str(config),
           "--model.init_args.base", str(tiny_pixel_base_dir), "--data.init_args.batch_size", "2",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.callbacks+=ddp_probe.DumpWeights", "--trainer.callbacks.out_dir", str(probe)]
    # ~25 s on an idle machine; the generous timeout only guards against a rank waiting forever
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    reports = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(probe / f"rank{r}.safetensors") for r in (0, 1)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world_size"] == 2 and rep["wrapped_in_ddp"], rep
        # the base is never in DDP's reducer (nor its broadcast buffers); every MCM parameter is
        assert rep["base_tensors"] > 0 and rep["base_in_ddp"] == 0, rep
        assert rep["mcm_in_reducer"] == rep["mcm_params"] == rep["reducer_params"] > 0, rep
        # the same number of batches on every rank although the shards are uneven
        assert rep["num_training_batches"] == rep["batches"] == rep["global_step"] == 3, rep
    assert not set(reports[0]["keys"]) & set(reports[1]["keys"]), "ranks must read disjoint shards"
    # regression (issue: correctness): every rank drew the same timesteps and noise for its different images
    for key in ("t", "noise"):
        assert len(reports[0][key]) == len(reports[1][key]) == 3, (key, reports[0][key])
        assert all(a != b for a, b in zip(reports[0][key], reports[1][key])), (key, reports[0][key], reports[1][key])

    # both ranks (different data) ended with identical MCM weights, and trained
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), f"ranks diverged at {k}"
    assert weights[0]["unet.conv_out.weight"].abs().sum() > 0, "the zero-initialised output layer never moved"
    ckpt = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    saved = {k.removeprefix("mcm."): v for k, v in ckpt["state_dict"].items()}
    assert saved.keys() == weights[0].keys() and all(torch.equal(saved[k], weights[0][k]) for k in saved)
    # wandb on rank zero only: a single offline run
    assert len(list((tmp_path / RUN / "wandb").glob("offline-run-*"))) == 1
    assert base_bytes(tiny_pixel_base_dir) == before, "the frozen base's files changed during a DDP fit"

    # validation read every sample of the 3 uneven shards exactly once across the 2 ranks (7 + 5, no padding)
    val_keys = [set(r["val_keys"]) for r in reports]
    assert sorted(reports[0]["val_keys"] + reports[1]["val_keys"]) == shard_keys(str(shards / "val-*.tar"))
    assert not val_keys[0] & val_keys[1] and len(val_keys[0]) == 7 and len(val_keys[1]) == 5, \
        [len(k) for k in val_keys]
    # ... and the loss both ranks saw is the exact mean over those 12 samples: a single-process `mcm validate` of
    # the same checkpoint (the weights of the last step) gives it too
    (loss0,), (loss1,) = reports[0]["val_loss"], reports[1]["val_loss"]
    assert loss0 == loss1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["mcm"])
    from mcm.cli.lightning_cli import run_lightning_cli

    cli = run_lightning_cli(["validate", "-c", str(MULTIMODAL), "-c", str(config), "--model.init_args.base",
                             str(tiny_pixel_base_dir), "--data.init_args.batch_size", "2", "--trainer.logger", "false",
                             "--ckpt_path", str(tmp_path / RUN / "checkpoints" / "last.ckpt")])
    single = float(cli.trainer.callback_metrics["val/loss"])
    assert single == pytest.approx(loss0, rel=1e-6, abs=0), (single, loss0)
