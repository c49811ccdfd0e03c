"""The README's "Stable Diffusion and your own photos" section, run as written (issue 28 item 6).

The commands are read from the README's ``bash`` blocks at test time, so the test runs whatever the README
says now.  Only the model directories are replaced (``models/sd15``, ``models/segformer``, ``models/dpt`` ->
tiny random SD, SegFormer and DPT directories built here); the files a user brings (``photos/`` with its
``metadata.jsonl``, ``labels.yaml``, ``my_map.png``, ``my_sketch.png``) are made here under those names.
``mcm fit`` alone gets arguments appended (:data:`TINY_RUN`): the tiny base's image size in place of SD's
512 and a two-step run in place of 20,000 steps.  After each command the test checks what it must produce.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.pack import in_validation
from mcm.cli import main as mcm_main

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Stable Diffusion and your own photos"
SIZE = 64  # the tiny SD's native size (x8 VAE, 8x8 latents)
VAL_FRACTION = 0.05  # as the README's pack command says; the photo names below are chosen to put 2 in val
#: appended to `mcm fit` only: a run a CPU finishes in seconds, on the tiny base's image size
TINY_RUN = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--data.init_args.image_size", str(SIZE),
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]


def readme_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The section's commands, one argv each: ``bash`` blocks, continuation lines joined, comments dropped."""
    text = readme.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _photos(folder: Path) -> tuple[list[str], list[str]]:
    """Photos with an imagefolder ``metadata.jsonl``: 8 in training, 2 in validation (by the pack's own hash)."""
    folder.mkdir()
    train, val, rng = [], [], np.random.default_rng(0)
    for i in range(200):
        stem = f"photo_{i:03d}"
        bucket = val if in_validation(stem, VAL_FRACTION) else train
        if len(bucket) < (2 if bucket is val else 8):
            bucket.append(stem)
        if len(train) == 8 and len(val) == 2:
            break
    with open(folder / "metadata.jsonl", "w") as f:
        for stem in train + val:
            img = np.full((SIZE, SIZE, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            y, x = rng.integers(8, SIZE - 24, 2)
            img[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)  # a square on a plain background
            Image.fromarray(img).save(folder / f"{stem}.jpg", quality=95)
            f.write(json.dumps({"file_name": f"{stem}.jpg", "text": f"a square, {stem}"}) + "\n")
    return train, val


def _samples(pattern: str, cwd: Path) -> int:
    n = 0
    for p in sorted(cwd.glob(pattern)):
        with tarfile.open(p) as tf:
            n += len({m.name.split(".", 1)[0] for m in tf if m.isfile()})
    return n


def _run(argv: list[str], cwd: Path, monkeypatch) -> None:
    if argv[0] == "mcm" and argv[1] != "fit":
        monkeypatch.chdir(cwd)
        try:
            code = mcm_main(argv[1:])
        except SystemExit as e:
            code = e.code
        assert code in (0, None), f"{shlex.join(argv)} exited with {code}"
        return
    # mcm fit (a wandb run and Lightning's process state) and python -m ...: in their own process
    if argv[0] == "mcm":
        argv = [sys.executable, "-m", "mcm.cli"] + argv[1:]
    elif argv[0] == "python":
        argv = [sys.executable] + argv[1:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


def test_the_readme_photo_section_runs_as_written(tiny_sd_dir, seg_dir, depth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["mcm"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    models = {"models/sd15": str(tiny_sd_dir), "models/segformer": str(seg_dir), "models/dpt": str(depth_dir)}
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")  # the README runs from the repository's root
    train, val = _photos(tmp_path / "photos")
    (tmp_path / "labels.yaml").write_text("wall: 0\nperson: 1\ncar: 2\nsky: 3\n")
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[16:48, 8:40] = 2
    Image.fromarray(labels).save(tmp_path / "my_map.png")
    Image.fromarray(np.where(np.abs(np.arange(SIZE) - 32) < 1, 255, 0).astype(np.uint8)[None].repeat(SIZE, 0)
                    ).save(tmp_path / "my_sketch.png")

    commands = readme_commands()
    names = [" ".join(a[:3]) if a[0] == "mcm" and a[1] == "data" else " ".join(a[:2]) for a in commands]
    assert names == ["mcm data pack", "mcm data inspect", "mcm data encode", "mcm fit",
                     "python -m", "mcm export", "mcm evaluate", "mcm sample"], names
    for argv, name in zip(commands, names):
        unknown = [a for a in argv if a.startswith("models/") and a not in models]
        assert not unknown, f"{name}: model directories this test does not build: {unknown}"
        argv = [models.get(a, a) for a in argv] + (TINY_RUN if name == "mcm fit" else [])
        _run(argv, tmp_path, monkeypatch)

        if name == "mcm data pack":  # both splits, every photo, each with its derived maps and caption
            assert _samples("shards/train-*.tar", tmp_path) == len(train)
            assert _samples("shards/val-*.tar", tmp_path) == len(val)
            with tarfile.open(next(tmp_path.glob("shards/val-*.tar"))) as tf:
                members = {m.name.split(".", 1)[1] for m in tf}
            assert {"seg.png", "depth.png", "sketch.png", "txt", "json"} <= members, members
        elif name == "mcm data encode":
            assert _samples("shards_sd15/train-*.tar", tmp_path) == len(train)
            assert _samples("shards_sd15/val-*.tar", tmp_path) == len(val)
            assert json.loads((tmp_path / "shards_sd15" / "base.json").read_text())["image_size"] == SIZE
        elif name == "mcm fit":
            assert (tmp_path / "runs/my_sd15/checkpoints/last.ckpt").is_file()
            from mcm.evaluation.wandb_offline import read_offline_run

            history, _ = read_offline_run(next((tmp_path / "runs/my_sd15/wandb").glob("offline-run-*")), timeout=30)
            logged = {k for row in history for k in row}
            assert {"align/seg_miou", "align/sketch_f1", "train/loss"} <= logged, sorted(logged)
        elif name == "python -m":
            assert Image.open(tmp_path / "alignment.png").size[0] > 100
        elif name == "mcm export":
            assert (tmp_path / "exports/my_sd15").is_dir() and any((tmp_path / "exports/my_sd15").iterdir())
        elif name == "mcm evaluate":
            report = json.loads((tmp_path / "eval/my_sd15/metrics.json").read_text())
            text = json.dumps(report)
            assert "seg_miou" in text and "sketch_f1" in text
        elif name == "mcm sample":
            image = Image.open(tmp_path / "out.png")
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
            assert np.asarray(image).std() > 0


@pytest.mark.parametrize("bad", ["```bash\nmcm data pack \\\n  --images x\n```"])
def test_commands_are_read_with_their_continuation_lines(bad, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{SECTION}\n\n{bad}\n\n## Next\n```bash\nmcm other\n```\n")
    assert readme_commands(readme) == [["mcm", "data", "pack", "--images", "x"]]
