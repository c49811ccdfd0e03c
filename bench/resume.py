"""Kill a real ``mcm fit`` with SIGKILL at chosen steps, resume it with ``--ckpt_path last``, and compare the
end state with an uninterrupted run: MCM weights, EMA weights, optimizer moments, learning rate, steps.

The run is ``experiments/shapes32/multimodal.yaml`` (the frozen shipped shapes32 base, 4 modalities with
modality and caption dropout, EMA, validation with sample grids) with a small overlay: a 2-level MCM,
generated 32x32 shapes shards (``--train`` images in shards of 8, so epochs of ``train / batch`` steps),
one data worker, a checkpoint every ``--every`` steps, validation every 4 steps, no logger.

A kill is placed without timing: the killed run's :class:`HaltAt` callback writes a file at the start of
its step and then blocks; the harness waits for that file and sends SIGKILL, so the process dies at
exactly that step (having written the checkpoints of the steps before it).  The resumed run continues
from the last checkpoint at or before that step.

    python -m bench.resume --points 5 --seed 0        # 5 random kill points, one max_time stop
    python -m bench.resume --points 2 --ddp           # the same under DDP: 2 CPU ranks (gloo)

prints one line per point and a JSON summary (the figures in docs/reliability.md).
``tests/test_resume.py`` runs the same harness at 2 points.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
MULTIMODAL = REPO / "experiments" / "shapes32" / "multimodal.yaml"
CKPT = Path("runs/shapes32_multimodal/checkpoints/last.ckpt")  # under each run's cwd


class HaltAt(Callback):
    """At the start of training step ``step`` (``global_step == step``), write ``path`` and block forever:
    the process is then SIGKILLed by whoever waits on ``path``.  Args: step, path."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()} {trainer.global_step} {trainer.current_epoch} {batch_idx}\n")
            os.replace(tmp, self.path)
            threading.Event().wait()  # until SIGKILL


class ExpireMaxTimeAt(Callback):
    """Makes Lightning's ``Timer`` (``trainer.max_time``) find its time used up at the end of step ``step``:
    the start time is moved back an hour just before the Timer checks, so the ``max_time`` stop happens at a
    chosen step instead of a wall-clock moment.  Args: step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        from lightning.pytorch.callbacks import Timer
        from lightning.pytorch.trainer.states import RunningStage

        if trainer.global_step == self.step:
            for cb in trainer.callbacks:
                if isinstance(cb, Timer):
                    cb._start_time[RunningStage.TRAINING] -= 3600.0


def fresh(d: Path) -> Path:
    """An empty run directory (a leftover last.ckpt would make ModelCheckpoint write last-v1.ckpt)."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def make_shards(out: Path, train: int = 24, val: int = 8) -> Path:
    from datamodules.shapes import write_shapes_shards

    if not (out / "train-000000.tar").exists():
        write_shapes_shards(out, train=train, val=val, size=32, shard_size=8, workers=1)
    return out


def overlay(path: Path, shards: Path, *, max_steps: int, every: int, batch_size: int = 4, ddp: bool = False) -> Path:
    """The small settings over the multimodal experiment (a full callback list: lists replace, not merge);
    ``ddp``: two CPU ranks (gloo), each decoding in its own process (``num_workers: 0``)."""
    ckpt_dir = "runs/shapes32_multimodal/checkpoints"
    cfg = {
        "trainer": {"max_steps": max_steps, "max_time": None, "val_check_interval": 4, "limit_val_batches": None,
                    "log_every_n_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": ckpt_dir, "save_last": True, "every_n_train_steps": every,
                                       "save_top_k": 0}},
                        {"class_path": "mcm.training.rng_state.RNGState"},
                        {"class_path": "mcm.training.stop_checkpoint.CheckpointOnStop"}]},
        "model": {"init_args": {"block_out_channels": [16, 32], "attention_levels": [1], "warmup_steps": 3,
                                "val_sample_steps": 2, "num_val_samples": 2}},
        "data": {"init_args": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                               "batch_size": batch_size, "num_workers": 1, "limit_train_samples": None}},
    }
    if ddp:
        cfg["trainer"].update(strategy="ddp", devices=2, accelerator="cpu")
        cfg["data"]["init_args"]["num_workers"] = 0
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MCM_ALLOW_CLASS_PREFIXES": "bench.resume", "WANDB_MODE": "disabled"}


def fit_argv(config: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(MULTIMODAL), "-c", str(config), *extra]


def run_fit(cwd: Path, config: Path, *extra: str) -> None:
    """``mcm fit`` in a subprocess (one torch thread), raising with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-m", "mcm.cli", *fit_argv(config, *extra)], cwd=cwd, env=env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mcm fit {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def run_killed(cwd: Path, config: Path, step: int, poll_s: float = 0.05) -> dict:
    """Start ``mcm fit``, wait until its :class:`HaltAt` reaches ``step``, SIGKILL it; returns where it died."""
    halt = cwd / "halted_at"
    halt.unlink(missing_ok=True)
    cb = "--trainer.callbacks+=bench.resume.HaltAt"
    argv = fit_argv(config, cb, "--trainer.callbacks.step", str(step), "--trainer.callbacks.path", str(halt))
    # its own process group: under DDP the launcher starts the other rank, and SIGKILL must reach every rank
    proc = subprocess.Popen([sys.executable, "-m", "mcm.cli", *argv], cwd=cwd, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not halt.exists():  # the run blocks at the step once the file exists: no race, no deadline
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended before step {step}:\n{proc.stderr.read()[-4000:]}")
            time.sleep(poll_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    pid, at, epoch, batch_idx = map(int, halt.read_text().split())
    ckpt = torch.load(cwd / CKPT, map_location="cpu", weights_only=True)
    return {"killed_at": at, "epoch": epoch, "batch_in_epoch": batch_idx, "resumed_from": ckpt["global_step"]}


def end_state(cwd: Path) -> dict:
    return torch.load(cwd / CKPT, map_location="cpu", weights_only=True)


def _tensors(x, prefix: str = ""):
    """``(name, tensor or number)`` leaves of nested dicts / lists."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(ref: dict, got: dict) -> dict:
    """Bit-for-bit comparison of what a resumed run must reproduce; returns counts and the differing names."""
    parts = {"weights": (ref["state_dict"], got["state_dict"]), "ema": (ref["ema"], got["ema"]),
             "optimizer": (ref["optimizer_states"], got["optimizer_states"]),
             "lr_schedulers": (ref["lr_schedulers"], got["lr_schedulers"])}
    out: dict = {"global_step": (ref["global_step"], got["global_step"]), "different": []}
    for part, (a, b) in parts.items():
        la, lb = dict(_tensors(a)), dict(_tensors(b))
        if la.keys() != lb.keys():
            out["different"].append(f"{part}: keys differ {sorted(set(la) ^ set(lb))[:5]}")
        n = 0
        for k in la.keys() & lb.keys():
            va, vb = la[k], lb[k]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) else va == vb
            n += isinstance(va, torch.Tensor)
            if not same:
                out["different"].append(f"{part}.{k}")
        out[f"{part}_tensors"] = n
    out["lr"] = (ref["lr_schedulers"][0]["_last_lr"], got["lr_schedulers"][0]["_last_lr"])
    out["equal"] = not out["different"] and ref["global_step"] == got["global_step"]
    out["n_different"], out["different"] = len(out["different"]), out["different"][:5]
    return out


def resume_point(root: Path, shards: Path, ref: dict, step: int, *, max_steps: int, every: int,
                 resume_in_process=None, resume_args: tuple[str, ...] = (), ddp: bool = False) -> dict:
    """Kill at ``step``, resume with ``--ckpt_path last``, compare with ``ref``."""
    cwd = fresh(root / f"kill_{step:03d}{'_ddp' if ddp else ''}")
    config = overlay(cwd / "tiny.yaml", shards, max_steps=max_steps, every=every, ddp=ddp)
    where = run_killed(cwd, config, step)
    (resume_in_process or run_fit)(cwd, config, "--ckpt_path", "last", *resume_args)
    return {**where, "cwd": cwd, **compare(ref, end_state(cwd))}


def max_time_point(root: Path, shards: Path, ref: dict, step: int, *, max_steps: int, every: int,
                   resume_in_process=None, run=None, ddp: bool = False) -> dict:
    """Lightning's ``max_time`` stop at ``step`` (:class:`ExpireMaxTimeAt`): ``last.ckpt`` must hold that step
    (not the last multiple of ``every``); resume without the limit and compare."""
    cwd = fresh(root / f"max_time_{step:03d}{'_ddp' if ddp else ''}")
    config = overlay(cwd / "tiny.yaml", shards, max_steps=max_steps, every=every, ddp=ddp)
    (run or run_fit)(cwd, config, "--trainer.max_time", "00:01:00:00",
                     "--trainer.callbacks+=bench.resume.ExpireMaxTimeAt", "--trainer.callbacks.step", str(step))
    stopped = end_state(cwd)["global_step"]
    (resume_in_process or run_fit)(cwd, config, "--ckpt_path", "last")
    return {"killed_at": None, "stopped_by_max_time_at": stopped, "resumed_from": stopped,
            **compare(ref, end_state(cwd))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_resume", help="work directory")
    p.add_argument("--points", type=int, default=5, help="random kill points")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of kill points")
    p.add_argument("--train", type=int, default=24, help="training images (epochs of train/4 steps)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--ddp", action="store_true", help="two CPU ranks (gloo) instead of one process")
    a = p.parse_args()
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shards = make_shards(root / "shards", train=a.train)
    t0 = time.time()
    ref_dir = fresh(root / "reference")
    run_fit(ref_dir, overlay(ref_dir / "tiny.yaml", shards, max_steps=a.max_steps, every=a.every, ddp=a.ddp))
    ref = end_state(ref_dir)
    steps_per_epoch = a.train // (4 * (2 if a.ddp else 1))
    points = sorted(random.Random(a.seed).sample(range(2, a.max_steps), a.points))
    print(f"uninterrupted: {a.max_steps} steps ({steps_per_epoch} per epoch) in {time.time() - t0:.0f} s; "
          f"kill points {points}, checkpoint every {a.every} steps", flush=True)
    rows = []
    for step in points:
        r = resume_point(root, shards, ref, step, max_steps=a.max_steps, every=a.every, ddp=a.ddp)
        rows.append(r)
        print(f"killed at step {r['killed_at']:3d} (epoch {r['epoch']}, batch {r['batch_in_epoch']}), resumed from "
              f"{r['resumed_from']:3d}: equal={r['equal']} ({r['weights_tensors']} weight, {r['ema_tensors']} EMA, "
              f"{r['optimizer_tensors']} optimizer tensors; lr {r['lr'][1]}) {r['different'][:3]}", flush=True)
    stop = next(s for s in range(a.max_steps - 1, 0, -1) if s % a.every)  # off the checkpoint interval
    r = max_time_point(root, shards, ref, stop, max_steps=a.max_steps, every=a.every, ddp=a.ddp)
    rows.append(r)
    print(f"max_time stop at step {r['stopped_by_max_time_at']} (last.ckpt), resumed: equal={r['equal']} "
          f"{r['different'][:3]}", flush=True)
    summary = {"ddp": a.ddp, "max_steps": a.max_steps, "steps_per_epoch": steps_per_epoch, "checkpoint_every": a.every,
               "points": rows, "all_equal": all(r["equal"] for r in rows), "seconds": round(time.time() - t0)}
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
