"""Base-free training (issue 27 item 5): when every training and validation shard carries the base's cached
predictions (``mcm data encode --predictions K``), ``mcm fit`` never reads the denoiser's weights.  With the
weight files deleted the run still trains, and its weights equal, bit for bit, those of the same run with the
files present and loaded; the validation grids that need the denoiser say they are off instead of failing."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from datamodules.shapes import write_shapes_shards
from mcm.cli import main as mcm
from mcm.models.base_loading import BUILTIN_BASES
from mcm.models.frozen_base import FrozenBase

REPO = Path(__file__).resolve().parents[1]


def _fit(base: Path, shards: Path, root: Path, *extra: str) -> dict[str, torch.Tensor]:
    mcm(["fit", "-c", str(REPO / "experiments/shapes32/segmentation.yaml"), "--model.init_args.base", str(base),
         "--data.init_args.train_shards", str(shards / "train-*.tar"),
         "--data.init_args.val_shards", str(shards / "val-*.tar"), "--data.init_args.num_workers", "0",
         "--data.init_args.batch_size", "4", "--data.init_args.limit_train_samples", "null",
         "--trainer.max_steps", "4", "--trainer.max_time", "null", "--trainer.val_check_interval", "2",
         "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
         "--model.init_args.num_val_samples", "2", "--model.init_args.val_sample_steps", "2",
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
         "--trainer.default_root_dir", str(root), *extra])
    ckpt = torch.load(next(root.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    return ckpt


def test_fit_without_the_denoisers_weights_equals_the_fit_with_them(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["mcm"])
    base = tmp_path / "base"
    shutil.copytree(BUILTIN_BASES["shapes32"], base)
    raw = tmp_path / "raw"
    write_shapes_shards(raw, train=16, val=4, shard_size=8, workers=1)
    with pytest.raises(SystemExit) as done:
        mcm(["data", "encode", "--base", str(base), str(raw / "train-*.tar"), str(raw / "val-*.tar"),
             "--out", str(tmp_path / "enc"), "--predictions", "2", "--batch-size", "8"])
    assert done.value.code == 0

    with_weights = _fit(base, tmp_path / "enc", tmp_path / "run_a", "--model.init_args.load_denoiser", "true")
    for f in (base / "unet").glob("*.safetensors"):
        f.unlink()  # the denoiser's weights are gone: only its config.json is left
    with pytest.raises(OSError):
        FrozenBase.from_pretrained(base)  # a run that needs them cannot load the base at all
    caplog.clear()
    caplog.set_level(logging.INFO)
    without = _fit(base, tmp_path / "enc", tmp_path / "run_b")
    text = caplog.text
    assert "the denoiser's weights are not loaded" in text
    assert "validation grids and alignment are off for this run" in text

    a, b = with_weights["state_dict"], without["state_dict"]
    assert sorted(a) == sorted(b) and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert with_weights["mcm_base"]["hash"] == without["mcm_base"]["hash"]  # the shards' record stood in
    assert with_weights["global_step"] == without["global_step"] == 4


def test_a_skeleton_denoiser_loads_its_weights_when_something_runs_it(tiny_sd_dir):
    lazy = FrozenBase.from_pretrained(tiny_sd_dir, denoiser_weights=False)
    assert not lazy.denoiser_loaded and lazy.device == torch.device("cpu")
    eager = FrozenBase.from_pretrained(tiny_sd_dir)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ctx = eager.encode_context(["a ring"], batch_size=1)
    assert torch.equal(lazy.predict(x, t, ctx), eager.predict(x, t, ctx))
    assert lazy.denoiser_loaded and lazy.content_hash() == eager.content_hash()


@pytest.mark.parametrize("family,size", [("sdxl", 16), ("sd3", 16), ("pixart_sigma", 16), ("flux", 32),
                                         ("flux2", 32), ("qwenimage", 32), ("sana", 16),
                                         ("zimage", 32)])
def test_base_free_fit_of_each_familys_template(family, size, tmp_path, monkeypatch, caplog, request):
    """Each family's template trains 2 steps from cached predictions with the denoiser's weight files deleted."""
    from test_templates import template_fit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["mcm"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = tmp_path / "base"
    shutil.copytree(request.getfixturevalue(f"tiny_{family}_dir"), base)
    raw = tmp_path / "raw"
    write_shapes_shards(raw, train=8, val=4, size=size, shard_size=8, workers=1)
    with pytest.raises(SystemExit) as done:
        mcm(["data", "encode", "--base", str(base), str(raw / "train-*.tar"), str(raw / "val-*.tar"),
             "--out", str(tmp_path / "enc"), "--predictions", "2", "--batch-size", "4", "--image-size", str(size)])
    assert done.value.code == 0
    weights = [f for sub in ("unet", "transformer") for f in (base / sub).glob("*.safetensors")]
    assert weights
    for f in weights:
        f.unlink()
    caplog.set_level(logging.INFO)
    template_fit(family, base, tmp_path / "enc", size)
    assert "the denoiser's weights are not loaded" in caplog.text
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
