"""Train the shipped ``shapes32`` judges on exact ``shapes`` ground truth, then measure them on held-out data.

    nice -n 19 python -m mcm.evaluation.judges.train --out mcm/weights/shapes32/judges

Training images are generated on the fly (``make_sample(seed, i, 32, "train")``: exact
labels and depth, a fresh batch every step, so no epoch and no overfitting); the held-out
score uses ``split="test"``, which no shard and no MCM run ever reads.  Robustness
augmentations (noise, blur, brightness) prepare the judges for generated images, which are
never as clean as the renderer's.  The script checkpoints every ``--ckpt-every`` steps to
``--work-dir`` and resumes from there; at the end it writes ``<out>/segmentation``,
``<out>/depth`` (``config.json`` + safetensors) and ``<out>/ACCURACY.md`` with the command.
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.shapes import CLASS_NAMES, make_sample

from ..metrics import DepthAlignment, SegmentationAlignment, iou_per_class
from .networks import JudgeUNet

log = logging.getLogger("mcm.evaluation.judges.train")
DATA_SEED = 0  # the shapes seed the judges learn from (train split) and are scored on (test split)


def shapes_batch(start: int, batch_size: int, size: int = 32, split: str = "train", seed: int = DATA_SEED
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples ``start .. start+batch_size-1``: images ``(B,3,S,S)`` in [0,1], labels ``(B,S,S)``, depth ``(B,1,S,S)``.
    """
    samples = [make_sample(seed, i, size, split) for i in range(start, start + batch_size)]
    img = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
    seg = torch.from_numpy(np.stack([s.seg for s in samples]).astype(np.int64))
    depth = torch.from_numpy(np.stack([s.depth for s in samples]).astype(np.float32) / 65535.0)[:, None]
    return img, seg, depth


def augment(img: torch.Tensor, seg: torch.Tensor, depth: torch.Tensor, g: torch.Generator):
    """Horizontal flip (jointly), then on the image only: brightness, 3x3 blur, gaussian noise."""
    B = img.shape[0]
    flip = torch.rand(B, generator=g) < 0.5
    img, seg, depth = (torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x) for x in (img, seg, depth))
    img = img * (1 + 0.2 * (torch.rand(B, 1, 1, 1, generator=g) - 0.5))
    blur = (torch.rand(B, 1, 1, 1, generator=g) < 0.3).float()
    blurred = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    img = blur * (0.5 * img + 0.5 * blurred) + (1 - blur) * img
    img = img + torch.randn(img.shape, generator=g) * 0.04 * torch.rand(B, 1, 1, 1, generator=g)
    return img.clamp(0, 1), seg, depth


def loss_fn(model: JudgeUNet, img: torch.Tensor, seg: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    out = model(img)
    if model.config.task == "segmentation":
        return F.cross_entropy(out, seg)
    return F.mse_loss(torch.sigmoid(out), depth)


def train_one(task: str, steps: int, batch_size: int, lr: float, seed: int, work_dir: Path, ckpt_every: int
              ) -> tuple[JudgeUNet, float]:
    """Train (or resume) one judge; returns it in eval mode and its training wall time (all sessions)."""
    torch.manual_seed(seed)
    model = JudgeUNet(task=task, num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ckpt, step, spent = work_dir / f"{task}.ckpt", 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["steps"] == steps:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            step, spent = state["step"], float(state.get("seconds", 0.0))
            log.info("%s: resumed from %s at step %d", task, ckpt, step)
        else:
            log.warning("%s: ignoring %s (made for %d steps, not %d)", task, ckpt, state["steps"], steps)
    g = torch.Generator()
    t0, running = time.time(), None
    model.train()
    while step < steps:
        g.manual_seed(seed + 1 + step)  # augmentation depends on the step only: resuming reproduces it
        img, seg, depth = augment(*shapes_batch(step * batch_size, batch_size), g)
        loss = loss_fn(model, img, seg, depth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps:
            log.info("%s step %d/%d loss %.4f (%.1f s)", task, step, steps, running, time.time() - t0)
        if step % ckpt_every == 0 or step == steps:
            work_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "steps": steps, "seconds": spent + time.time() - t0}, ckpt)
    return model.eval(), spent + time.time() - t0


@torch.no_grad()
def evaluate_judges(seg_model: JudgeUNet | None, depth_model: JudgeUNet | None, n: int, batch_size: int = 100
                    ) -> dict[str, float | list[float]]:
    """Held-out scores on ``make_sample(DATA_SEED, i, 32, "test")`` for ``i < n``."""
    seg_m, depth_m, mask_m = SegmentationAlignment(len(CLASS_NAMES)), DepthAlignment(), DepthAlignment()
    for start in range(0, n, batch_size):
        img, seg, depth = shapes_batch(start, min(batch_size, n - start), split="test")
        if seg_model is not None:
            seg_m.update(seg_model.predict(img), seg)
        if depth_model is not None:
            depth_m.update(depth_model.predict(img), depth)
        mask_m.update((seg == 0).float()[:, None], depth)  # reference: background far, every object equally near
    out: dict[str, float | list[float]] = {}
    if seg_model is not None:
        out.update({"seg_miou": seg_m.compute()["miou"], "seg_pixel_acc": seg_m.compute()["pixel_acc"],
                    "seg_iou_per_class": [round(float(v), 4) for v in iou_per_class(seg_m.confmat)]})
    if depth_model is not None:
        d = depth_m.compute()
        out.update({"depth_ssi_rmse": d["ssi_rmse"], "depth_delta1": d["delta1"]})
    ref = mask_m.compute()
    out.update({"layout_ref_ssi_rmse": ref["ssi_rmse"], "layout_ref_delta1": ref["delta1"]})
    return out


def write_accuracy(out: Path, scores: dict, info: dict) -> Path:
    ious = scores.get("seg_iou_per_class", [])
    seg_rows = "\n".join(f"| {name} | {iou:.4f} |" for name, iou in zip(CLASS_NAMES, ious))
    text = f"""# shapes32 judges: held-out accuracy

Written by `mcm/judges/train.py`. Held-out set: `make_sample({DATA_SEED}, i, 32, "test")` for
i < {info['eval_n']} (the `test` split, never used for training the judges or any MCM).

Command:

```
{info['command']}
```

Training: {info['steps']}, batch {info['batch_size']}, fresh `shapes` samples every step (split `train`,
seed {DATA_SEED}), {info['threads']} CPU thread(s); wall time {info['minutes']:.1f} min. Parameters:
{info['params']}; files: {info['sizes']}.

## Segmentation judge (`shapes32-segmentation`)

| metric | value |
|---|---|
| mIoU | {scores.get('seg_miou', float('nan')):.4f} |
| pixel accuracy | {scores.get('seg_pixel_acc', float('nan')):.4f} |

| class | IoU |
|---|---|
{seg_rows}

## Depth judge (`shapes32-depth`)

| metric | judge | layout reference |
|---|---|---|
| ssi-RMSE (lower is better) | {scores.get('depth_ssi_rmse', float('nan')):.4f} | {scores['layout_ref_ssi_rmse']:.4f} |
| delta < 1.25 (after scale/shift alignment) | {scores.get('depth_delta1', float('nan')):.4f} | {scores['layout_ref_delta1']:.4f} |

The layout reference predicts the exact background mask (`seg == 0`: background far, every
object equally near) as depth and is aligned the same way: it knows where every object is
but not how far.  In `shapes` each object's depth
is drawn at random, independently of its look, so no judge can read it from the image; only
occlusion order and the background's slight tilt are visible.  A judge close to the
reference has learned the layout (and what little the occlusion order tells); the rest of
the error is the unobservable part.  For evaluating samples this is what matters: whether
the objects sit where the depth map puts them, in the right front-to-back order.
"""
    path = out / "ACCURACY.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcm.evaluation.judges.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (segmentation/, depth/, ACCURACY.md)")
    p.add_argument("--work-dir", default="runs/judges", help="checkpoints for resuming (default runs/judges)")
    p.add_argument("--tasks", nargs="+", default=["segmentation", "depth"], choices=["segmentation", "depth"])
    p.add_argument("--seg-steps", type=int, default=1600)
    p.add_argument("--depth-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=1000, help="held-out test samples (default 1000)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    out, work = Path(a.out), Path(a.work_dir)
    models, wall = {}, 0.0
    for task in a.tasks:
        steps = a.seg_steps if task == "segmentation" else a.depth_steps
        models[task], dt = train_one(task, steps, a.batch_size, a.lr, a.seed, work, a.ckpt_every)
        wall += dt
        models[task].save_pretrained(out / task, safe_serialization=True)
    for task in ("segmentation", "depth"):  # score what is shipped, including a judge trained earlier
        if task not in models and (out / task / "config.json").is_file():
            models[task] = JudgeUNet.from_pretrained(out / task, use_safetensors=True).eval()
    scores = evaluate_judges(models.get("segmentation"), models.get("depth"), a.eval_n)
    info = {
        "command": "nice -n 19 python -m mcm.evaluation.judges.train " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "steps": ", ".join(f"{t} {a.seg_steps if t == 'segmentation' else a.depth_steps} steps" for t in a.tasks),
        "batch_size": a.batch_size, "threads": a.threads, "minutes": wall / 60, "eval_n": a.eval_n,
        "params": ", ".join(f"{t} {sum(p.numel() for p in m.parameters()):,}" for t, m in models.items()),
        "sizes": ", ".join(f"{t} {sum(f.stat().st_size for f in (out / t).iterdir()) / 1e6:.2f} MB" for t in models),
    }
    path = write_accuracy(out, scores, info)
    log.info("held-out scores %s; written to %s", {k: v for k, v in scores.items() if "per_class" not in k}, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
