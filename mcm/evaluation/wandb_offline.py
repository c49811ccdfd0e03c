"""Read an offline wandb run (``runs/<x>/wandb/offline-run-*/run-*.wandb``) without syncing it.

wandb 0.31 writes the run log from its Go core and no longer ships a Python reader, so this
parses the documented LevelDB-style framing and decodes wandb's own protobuf records. Used by
reports (time per step, last losses of a training run) and by the tracking test.
"""
from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768


def wandb_records(path: str | Path) -> Iterator[Any]:
    """Records (``wandb_internal_pb2.Record``) of a ``run-*.wandb`` file, in order.

    Layout: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each
    ``<crc32 u32><length u16><type u8><data>``; type 1 = full record, 2/3/4 = first/middle/last part.
    A chunk still being written (a live run) ends the iteration.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a wandb run log (header {ident!r}, magic {magic:#x}, version {version})")
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + n > len(data):
            return
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def run_file(run_dir: str | Path) -> Path:
    """The ``run-*.wandb`` file of an offline run directory (or of ``<save_dir>/wandb/latest-run``)."""
    run_dir = Path(run_dir)
    if (run_dir / "wandb" / "latest-run").exists():
        run_dir = run_dir / "wandb" / "latest-run"
    files = sorted(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one run-*.wandb file, found {len(files)}")
    return files[0]


def read_offline_run(run_dir: str | Path, timeout: float = 0.0) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline run, values JSON-decoded.

    ``wandb.finish()`` can return before wandb's core process has created the run file or written the last
    records: with ``timeout > 0``, wait that long for the file and its ``exit`` record first.
    """
    deadline = time.monotonic() + timeout
    while True:  # wandb's core process may create the run file only after wandb.finish() has returned
        try:
            path = run_file(run_dir)
            break
        except FileNotFoundError:
            if timeout <= 0 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    while timeout > 0 and not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s")
        time.sleep(0.2)
    history, config = [], {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
    return history, config


def seconds_per_step(history: list[dict]) -> float | None:
    """Wall seconds per optimizer step between the first and last logged training steps
    (validation and sample grids included: what a run really costs)."""
    rows = [(h["trainer/global_step"], h["_runtime"]) for h in history
            if "train/loss" in h and "_runtime" in h and "trainer/global_step" in h]
    if len(rows) < 2 or rows[-1][0] == rows[0][0]:
        return None
    return (rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0])
