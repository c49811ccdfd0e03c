"""Pretraining the embedded base: loss helpers, and a tiny ``mcm fit`` that stops, resumes and exports.

The run goes through the shipped ``experiments/shapes32/pretrain_base.yaml`` with a second, tiny
config on top (as a user would override it), inside ``tmp_path`` so nothing reaches ``runs/``.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from mcm.diffusion.forward_process import diffusion_target, min_snr_weights
from mcm.models.frozen_base import FrozenBase

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "shapes32" / "pretrain_base.yaml"


# ---- loss helpers -------------------------------------------------------------------------------
def _scheduler(prediction_type: str, beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)


def _x0_noise_t(batch: int = 4):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    return x0, torch.randn(batch, 3, 8, 8, generator=g), torch.tensor([0, 10, 500, 999])


def test_diffusion_target_epsilon_is_the_noise():
    x0, noise, t = _x0_noise_t()
    assert torch.equal(diffusion_target(_scheduler("epsilon"), x0, noise, t), noise)


def test_diffusion_target_v_prediction():
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, eq. 2 of appendix D)."""
    x0, noise, t = _x0_noise_t()
    sched = _scheduler("v_prediction")
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(diffusion_target(sched, x0, noise, t), expected)


def test_diffusion_target_sample_and_unknown():
    x0, noise, t = _x0_noise_t()
    assert torch.equal(diffusion_target(_scheduler("sample"), x0, noise, t), x0)
    with pytest.raises(ValueError, match="'flow'.*epsilon, v_prediction or sample"):
        diffusion_target(SimpleNamespace(config=SimpleNamespace(prediction_type="flow")), x0, noise, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "scaled_linear", "linear"])
def test_min_snr_weights_positive_finite_and_bounded(prediction_type, beta_schedule):
    sched, gamma = _scheduler(prediction_type, beta_schedule), 5.0
    t = torch.arange(sched.config.num_train_timesteps)
    w = min_snr_weights(sched, t, gamma)
    assert w.shape == t.shape and torch.isfinite(w).all() and (w > 0).all()
    assert (w <= 1 + 1e-6).all(), "min-SNR only ever down-weights"
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    expected = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(w, expected.float(), rtol=1e-4, atol=1e-6)


# ---- a tiny run that stops and resumes ----------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    from datamodules.shapes import write_shapes_shards

    out = tmp_path_factory.mktemp("shapes16")
    written = write_shapes_shards(out, train=64, val=16, size=16, shard_size=32, workers=1)
    assert len(written["train"]) == 2 and len(written["val"]) == 1
    return out


def _tiny_config(tmp: Path, shards: Path) -> Path:
    """A config layered over the experiment: tiny model, local shards, CSV logging, checkpoint every step."""
    cfg = {
        "trainer": {
            "default_root_dir": str(tmp / "run"), "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / "run")}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "dirpath": str(tmp / "ckpt"), "save_last": True, "every_n_train_steps": 1, "save_top_k": 0}}],
        },
        "model": {"class_path": "mcm.training.base_pretraining.BasePretrainModule", "init_args": {
            "sample_size": 16, "block_out_channels": [16, 32], "text_hidden": 32, "text_layers": 1,
            "warmup_steps": 2, "preview_every_n_steps": 2, "export_dir": str(tmp / "export")}},
        "data": {"class_path": "datamodules.ShardDataModule", "init_args": {
            "train_shards": str(shards / "train-*.tar"), "train_samples": 64, "image_size": 16, "batch_size": 8,
            "num_workers": 0, "shuffle_buffer": 16}},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *overrides: str) -> None:
    from mcm.cli import main

    main(["fit", "-c", str(EXPERIMENT), "-c", str(config), *overrides])


def test_pretraining_resumes_and_exports(tmp_path, shapes_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any relative path of the experiment would land here, never in runs/
    monkeypatch.setattr("sys.argv", ["mcm"])  # LightningCLI gets its arguments from args= only
    config = _tiny_config(tmp_path, shapes_shards)
    last = tmp_path / "ckpt" / "last.ckpt"

    # 1. three steps from scratch
    _fit(config, "--trainer.max_steps", "3", "--ckpt_path", "null")
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 3 and first["ema"]["optimization_step"] == 3
    assert (tmp_path / "run" / "samples" / "samples_ema_step000002.png").is_file()

    # 2. resume from last.ckpt (the experiment's ``ckpt_path: last``) up to five steps
    _fit(config, "--trainer.max_steps", "5", "--ckpt_path", "last")
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 5, "training must resume at step 3 and stop at 5"
    assert "ema" in final and final["ema"]["optimization_step"] == 5, "the EMA must resume too, not restart"
    assert not any(k.startswith("ema") for k in final["state_dict"]), "EMA lives under the 'ema' key only"
    losses = [float(r["train/loss"]) for f in sorted((tmp_path / "run").rglob("metrics.csv"))
              for r in csv.DictReader(f.open()) if r.get("train/loss")]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert not (tmp_path / "runs").exists(), "the tiny config must override every path of the experiment"

    # 3. the export is a base FrozenBase loads, with a tokenizer AutoTokenizer loads
    export = tmp_path / "export"
    base = FrozenBase.from_pretrained(export)
    assert base.is_text_conditional and base.downsample == 1 and base.prediction_type == "v_prediction"
    assert base.unet.config.sample_size == 16 and base.unet.config.block_out_channels == [16, 32]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    p = base.predict(x, torch.tensor([10, 500]), base.encode_text(["a red circle", ""]))
    assert p.shape == x.shape and torch.isfinite(p).all()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export / "tokenizer")
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length).input_ids[0]
    assert len(ids) == 24 and tok.unk_token_id not in ids
