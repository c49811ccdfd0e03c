"""Training the MCM from cached base predictions (``mcm data encode --predictions K``) against the online step.

Two measurements on ``shapes32`` (the shipped base and, for the precision check, the shipped MCM):

1. Step cost, side by side in one process (interleaved ``A B C D A B C D ...``, medians): A one no-grad base
   forward; B the online MCM step (``MCMModule._common_step`` with the base forward, backward, AdamW); C the
   same step from a cached batch (``pred`` / ``xt`` / ``target`` / ``pred_t``: no base forward), as inside a fit
   past its first batches (no batch value read back: no host synchronisation); D = C with the batch's values
   checked every step (the step before it became sync-free).  Printed as
   C / B and in base forwards; plus what the cache costs to make (2 K base forwards per sample, both guidance
   branches) and after how many epochs over the data it has paid for itself.
2. Storage precision: the MCM loss over every cached draw of real shapes32 samples, from float16-stored
   arrays against float32-stored ones (the choice of ``prediction_members(dtype=...)``; must be within 1%).

    python bench/cached_predictions.py --quick
    python bench/cached_predictions.py --tiny          # random tiny models: checks that the script runs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from mcm.training.prediction_cache import prediction_batch, prediction_members  # noqa: E402


def measure_steps(args) -> dict:
    m = C.build_model("shapes32", args)
    batch = C.make_batch(m, args.batch, args.device)
    cached = C.cached_prediction_batch(m, batch, args.k)
    online_module = C.build_mcm_module(m)
    online_opt = online_module.configure_optimizers()["optimizer"]
    cached_module = C.build_mcm_module(m)
    cached_opt = cached_module.configure_optimizers()["optimizer"]
    # the step from cached predictions with its batch values checked every step (the step before it became
    # sync-free) against the default (values checked on a fit's first batches; the DataModule checks every sample)
    checked_module = C.in_a_fit(C.build_mcm_module(m), value_check_batches=10**9)
    checked_opt = checked_module.configure_optimizers()["optimizer"]
    C.in_a_fit(cached_module)
    fns = {"base_forward": lambda: C.base_forward(m, batch),
           "online_step": lambda: C.mcm_step(online_module, online_opt, batch),
           "cached_step": lambda: C.mcm_step(cached_module, cached_opt, cached, read_loss=False),
           "cached_step_values_checked": lambda: C.mcm_step(checked_module, checked_opt, cached, read_loss=False)}
    reps, warmup = C.reps_of(args)
    times = C.interleaved(fns, reps, warmup, args.device)
    t = {k: v["median_s"] for k, v in times.items()}
    # what the cache costs: per sample 2 K base forwards (conditional + unconditional branch), once
    encode_forwards_per_batch = 2 * args.k
    saved_per_step = t["online_step"] - t["cached_step"]
    return {
        "base_source": m.source, "batch": args.batch, "k": args.k, "time_s": t,
        "time_min_s": {k: v["min_s"] for k, v in times.items()}, "reps": reps,
        "cached_over_online": t["cached_step"] / t["online_step"],
        "sync_free_over_values_checked": t["cached_step"] / t["cached_step_values_checked"],
        "online_step_in_base_forwards": t["online_step"] / t["base_forward"],
        "cached_step_in_base_forwards": t["cached_step"] / t["base_forward"],
        "encode_base_forwards_per_sample": encode_forwards_per_batch,
        # epochs of training over the cached data after which encoding (2K forwards per batch) is paid back
        "break_even_epochs": encode_forwards_per_batch * t["base_forward"] / saved_per_step
        if saved_per_step > 0 else float("inf"),
    }


def real_samples(shards: str, n: int) -> dict:
    """The first ``n`` validation samples of the shapes32 shards (all four modalities), as one batch."""
    from datamodules.shard_datamodule import ShardDataModule

    mods = {"segmentation": {"num_classes": 6}, "sketch": {}, "depth": {}, "partial_mask": {"num_classes": 6}}
    dm = ShardDataModule(val_shards=shards, modalities=mods, image_size=32, batch_size=n, num_workers=0)
    return next(iter(dm.val_dataloader()))


def measure_precision(args) -> dict:
    """MCM loss over all K draws of real samples: float16-stored arrays vs float32-stored ones."""
    from mcm.diffusion.forward_process import forward_process_for
    from mcm.models.frozen_base import FrozenBase
    from mcm.models.modulator import modulate
    from mcm.pipelines.module_io import load_module

    base = FrozenBase.from_pretrained("shapes32")
    mcm, _ = load_module("shapes32", base)
    mcm.eval()
    batch = real_samples(args.shards, args.precision_samples)
    B, keys = batch["image"].shape[0], [str(k) for k in batch["key"]]
    x0 = base.encode_images(batch["image"])
    context = base.encode_context(list(batch["caption"]), batch_size=B)
    fp = forward_process_for(base.scheduler)
    conditions = {n: batch[n] for n in mcm.modality_names}
    losses, base_losses = {}, {}
    for dtype in ("float32", "float16"):
        cache = prediction_batch(prediction_members(base, x0, context, keys, args.precision_k, dtype=dtype))
        per_branch = []
        for branch in ("pred", "pred_uncond"):
            with torch.no_grad():
                total, total_base = 0.0, 0.0
                for j in range(args.precision_k):
                    x_t, t, target, p = (cache[n][:, j] for n in ("xt", "pred_t", "target", branch))
                    state = mcm.encode_conditions(conditions, None, tuple(x_t.shape[-2:]), B)
                    gamma, beta = mcm.modulation(x_t, p, t, state)
                    total += float(fp.loss(modulate(p, gamma, beta, 1.0), target, t))
                    total_base += float(fp.loss(p, target, t))
            per_branch.append((branch, total / args.precision_k, total_base / args.precision_k))
        losses[dtype] = {b: loss for b, loss, _ in per_branch}
        base_losses[dtype] = {b: bl for b, _, bl in per_branch}
    rel = {b: abs(losses["float16"][b] - losses["float32"][b]) / losses["float32"][b] for b in losses["float32"]}
    return {"samples": B, "k": args.precision_k, "mcm_loss": losses, "base_loss": base_losses,
            "fp16_rel_diff": rel, "fp16_within_1pct": all(v < 0.01 for v in rel.values())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="training batch (experiments/shapes32: 32)")
    p.add_argument("--k", type=int, default=4, help="cached draws per sample in the timed batch")
    p.add_argument("--shards", default="data/shapes/val-*.tar", help="real samples for the precision check")
    p.add_argument("--precision-samples", type=int, default=64)
    p.add_argument("--precision-k", type=int, default=8)
    p.add_argument("--skip-precision", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="3 timed repetitions instead of 7")
    p.add_argument("--tiny", action="store_true", help="tiny random shapes32-format base (tests)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: with another job on this 2-core box, 2 threads ran ~100x slower)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.base_dtype, args.channels_last, args.compile = "float32", False, False  # what C.build_model reads
    out = {"steps": measure_steps(args)}
    s = out["steps"]
    print(f"shapes32 ({s['base_source']}), batch {s['batch']}, K={s['k']}, medians of {s['reps']} interleaved runs")
    for k, v in s["time_s"].items():
        print(f"  {k:26s} {1000 * v:8.1f} ms")
    print(f"  cached step / online step     {s['cached_over_online']:.3f}")
    print(f"  sync-free / values checked    {s['sync_free_over_values_checked']:.3f}  (cached step; CPU: no device "
          f"to wait for, only the checks' own work)")
    print(f"  online step in base forwards  {s['online_step_in_base_forwards']:.2f}")
    print(f"  cached step in base forwards  {s['cached_step_in_base_forwards']:.2f}")
    print(f"  encoding: {s['encode_base_forwards_per_sample']} base forwards per sample, paid back after "
          f"{s['break_even_epochs']:.1f} epochs")
    if not (args.skip_precision or args.tiny):
        out["precision"] = r = measure_precision(args)
        print(f"storage precision: shipped MCM on {r['samples']} real samples x {r['k']} draws")
        for b, v in r["fp16_rel_diff"].items():
            print(f"  {b:12s} loss fp32 {r['mcm_loss']['float32'][b]:.6f}  fp16 {r['mcm_loss']['float16'][b]:.6f}"
                  f"  rel diff {100 * v:.4f}%  (base alone {r['base_loss']['float32'][b]:.6f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
