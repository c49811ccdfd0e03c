"""Does data loading keep up with MCM training?  ``ShardDataModule`` samples/s vs one MCM step's.

1. Loader alone: samples/s of ``ShardDataModule.train_dataloader()`` on shapes shards with 0, 1
   and 2 workers (decoding, joint augmentation, batching), after the first batch (start-up is
   reported separately).
2. Training alone: samples/s one MCM training step on ``shapes32`` consumes (``MCMModule``'s
   step incl. its text encoding, backward, AdamW) on a fixed batch.
3. Together: loader feeding the training step; the stall share is how much slower that is
   than training alone (on a 2-core machine the workers compete with training for cores).

    python bench/data.py --quick --json bench_data.json
    python bench/data.py --shards 'data/shapes50k/train-*.tar'
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from datamodules.shapes import write_shapes_shards  # noqa: E402
from datamodules.shard_datamodule import ShardDataModule  # noqa: E402


def loader(shards: str, workers: int, args, size: int):
    dm = ShardDataModule(train_shards=shards, modalities={"segmentation": {"num_classes": 6}}, image_size=size,
                         batch_size=args.batch, num_workers=workers, train_samples=args.samples)
    return dm.train_dataloader()


def loader_throughput(shards: str, workers: int, args, size: int) -> dict:
    t0 = time.perf_counter()
    n, t_first = 0, None
    for i, batch in enumerate(loader(shards, workers, args, size)):
        if i == 0:
            t_first = time.perf_counter()
            continue
        n += batch["image"].shape[0]
    dt = time.perf_counter() - t_first
    return {"samples_per_s": n / dt, "startup_s": t_first - t0, "samples_timed": n}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=None, help="training shards (default: generate shapes shards to a temp dir)")
    p.add_argument("--samples", type=int, default=None, help="samples per epoch (default 2048, quick 1024, tiny 128)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.samples = args.samples or (128 if args.tiny else 1024 if args.quick else 2048)
    size = 16 if args.tiny else 32
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            write_shapes_shards(tmp, train=args.samples, val=0, size=size, shard_size=max(64, args.samples // 4),
                                workers=1)
            shards = f"{tmp}/train-*.tar"
        # 1. the loader alone
        data = {w: loader_throughput(shards, w, args, size) for w in map(int, args.workers.split(","))}
        # 2. the MCM step alone, on a real batch from the shards
        bargs = argparse.Namespace(tiny=args.tiny, device=args.device, base_dtype="float32", channels_last=False,
                                   sd_latent=32)
        m = C.build_model("shapes32", bargs)
        module = C.build_mcm_module(m)
        opt = module.configure_optimizers()["optimizer"]
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v
                 for k, v in next(iter(loader(shards, 0, args, size))).items()}
        reps = 3 if args.tiny else 5 if args.quick else 10
        step = C.interleaved({"mcm_step": lambda: C.mcm_step(module, opt, batch)}, reps, 1, args.device)
        train_sps = args.batch / step["mcm_step"]["median_s"]
        # 3. together: the loader feeding the step (1 worker: what the experiments use)
        n, t0 = 0, None
        for i, b in enumerate(loader(shards, 1, args, size)):
            if i == 1:
                t0 = time.perf_counter()  # after start-up and one step
            C.mcm_step(module, opt, {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in b.items()})
            n += args.batch if i >= 1 else 0
            if i >= reps * 2:
                break
        fed_sps = n / (time.perf_counter() - t0) if t0 is not None and n else float("nan")
    res = {
        "base_source": m.source, "batch": args.batch, "image_size": size, "samples_per_epoch": args.samples,
        "loader": {str(w): v for w, v in data.items()},
        "mcm_step_s": step["mcm_step"]["median_s"], "mcm_train_samples_per_s": train_sps,
        "loader_over_training": {str(w): v["samples_per_s"] / train_sps for w, v in data.items()},
        "fed_training_samples_per_s": fed_sps, "stall_share_1_worker": 1 - fed_sps / train_sps,
    }
    print(f"MCM training step on {m.name} ({m.source}), batch {args.batch}: {train_sps:.1f} samples/s")
    for w, v in data.items():
        print(f"loader, {w} workers: {v['samples_per_s']:8.1f} samples/s  (start-up {v['startup_s']:.2f} s)"
              f"  -> {v['samples_per_s'] / train_sps:.2f}x what training consumes")
    print(f"training fed by the loader (1 worker): {fed_sps:.1f} samples/s, "
          f"stall share {res['stall_share_1_worker']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
