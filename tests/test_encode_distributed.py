"""``mcm data encode --devices N``: the encoding through Lightning's ``Trainer.predict`` under DDP (issue 28
item 5).  Two gloo ranks on the CPU write exactly the samples and bytes one process writes, predictions
included, and a rerun after a lost shard redoes that shard alone.  Runs the CLI in subprocesses, as a user
runs it (Lightning's DDP launcher starts the second rank by re-running the command)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from shard_fixtures import sample_members, write_tar

ROOT = Path(__file__).resolve().parents[1]


def _shards(folder: Path, n_shards: int = 3, per_shard: int = 5) -> list[Path]:
    rng, paths = np.random.default_rng(0), []
    folder.mkdir(parents=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            seg = rng.integers(0, 6, (32, 32), dtype=np.uint8)
            members += sample_members(f"s{s}_{i:02d}", img, seg) + [(f"s{s}_{i:02d}.cls", b"%d" % (i % 4))]
        paths.append(write_tar(folder / f"train-{s:02d}.tar", members))
    return paths


def _encode(shards: list[Path], out: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "mcm.cli", "data", "encode", "--base", "shapes32",
                           *map(str, shards), "--out", str(out), "--predictions", "2", "--device", "cpu", *extra],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".json")}


def test_two_gloo_ranks_write_the_bytes_one_process_writes(tmp_path):
    shards = _shards(tmp_path / "raw")
    _encode(shards, tmp_path / "one")
    log = _encode(shards, tmp_path / "two", "--devices", "2", "--accelerator", "cpu")
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == ["base.json", "train-00.tar", "train-01.tar", "train-02.tar"]
    assert sorted(two) == sorted(one)
    for name in one:
        assert two[name] == one[name], f"{name} differs between 1 process and 2 ranks"
    assert "3 shards encoded, 0 skipped (already complete), 15 samples written, 0 bad" in log

    # resumable: a lost shard (and a partial one left by a killed rank) is redone, the others skipped
    (tmp_path / "two" / "train-01.tar").unlink()
    (tmp_path / "two" / "train-02.tar").rename(tmp_path / "two" / "train-02.tar.tmp")
    log = _encode(shards, tmp_path / "two", "--devices", "2", "--accelerator", "cpu")
    assert "2 shards encoded, 1 skipped (already complete), 10 samples written" in log
    assert _files(tmp_path / "two") == one
    assert not list((tmp_path / "two").glob("*.tmp"))
