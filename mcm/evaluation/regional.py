"""Regional and scheduled control measured on ``shapes32`` (the tables and grids in docs/results.md).

    python -m mcm.evaluation.regional --data "data/shapes/test-*.tar" --n 64 --seeds 0 1 --out docs/eval/test/regional

(a) **Left/right split.** Each held-out layout's left half is controlled and its right half is not:
  * ``strength map``: the shipped multimodal MCM with the segmentation map and a strength map that is 1
    on the left and 0 on the right;
  * ``regions``: the two shipped compose modules, segmentation acting only on the left half and sketch
    only on the right half (``regions=[left, right]``).
  Alignment is measured inside each half by the project's judges: segmentation mIoU and foreground IoU
  (judge's object pixels vs the map's), sketch F1.  *Leakage* is the right half's foreground IoU with
  the segmentation map, to compare with the base alone (no control) and the module everywhere.
(b) **Schedule sweep.** The shipped MCM with the segmentation map, modulating only in the noisiest
  20 / 40 / 60 / 100 % of the schedule (``control_guidance_end=f``): segmentation mIoU and judge-FID.
(c) Grids of each setting (maps, base alone, every setting; same seeds).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from datamodules.devices import resolve_device
from modalities.masks import foreground_iou

log = logging.getLogger(__name__)
STEPS = 25


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = x.shape[-1] // 2
    return x[..., :w], x[..., w:]


def fg_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of object pixels (label != 0) between the judge's labels and the maps, pooled over the batch."""
    return float(foreground_iou(pred.reshape(1, -1), target.reshape(1, -1))[0])


@torch.no_grad()
def run(data: str, n: int, seeds: list[int], out: Path, device: str = "cpu") -> dict:
    from mcm.evaluation import metrics as M
    from mcm.evaluation.evaluate import SEED_STRIDE, load_data
    from mcm.evaluation.judges import load_judge
    from mcm.pipelines import MCMPipeline
    from mcm.pipelines.grids import labelled_grid

    multi = MCMPipeline.from_pretrained("shapes32", device=device)
    compose = MCMPipeline.from_pretrained("shapes32", modules=["shapes32_compose_segmentation",
                                                               "shapes32_compose_sketch"], device=device)
    for p in (multi, compose):
        p.set_progress_bar_config(disable=True)
    alone = MCMPipeline.from_base(multi.base, [], scheduler=multi.scheduler)
    alone.set_progress_bar_config(disable=True)
    judge = load_judge("shapes32-segmentation", task="segmentation", device=device)
    d = load_data(data, {"segmentation": {"num_classes": 6}, "sketch": {}}, 32, n)
    seg, sketch = d["segmentation"], d["sketch"]
    H, W = seg.shape[-2:]
    left = torch.zeros(H, W)
    left[:, : W // 2] = 1.0

    def sample(pipe, **kw) -> torch.Tensor:  # (S*N, 3, H, W), seed-major
        outs = [pipe(seeds=[s * SEED_STRIDE + i for i in range(len(seg))], num_inference_steps=STEPS,
                     output_type="pt", **kw).images.cpu() for s in seeds]
        return torch.cat(outs)

    rep = lambda x: x.repeat(len(seeds), *[1] * (x.ndim - 1))  # noqa: E731
    S_seg, S_sk = rep(seg), rep(sketch)
    samples = {
        "base alone": sample(alone, num_images=len(seg)),
        "MCM everywhere": sample(multi, conditions={"segmentation": seg}),
        "MCM, strength map 1 left / 0 right": sample(multi, conditions={"segmentation": seg},
                                                                    conditioning_scale=left),
        "compose: seg everywhere + sketch everywhere": sample(compose, conditions=[{"segmentation": seg},
                                                                                    {"sketch": sketch}]),
        "compose: seg left, sketch right (regions)": sample(compose, conditions=[{"segmentation": seg},
                                                                                  {"sketch": sketch}],
                                                            regions=[left, 1 - left]),
    }
    fractions = (0.2, 0.4, 0.6, 1.0)
    for f in fractions:
        samples[f"MCM, noisiest {int(f * 100)}% only"] = sample(multi, conditions={"segmentation": seg},
                                                                 control_guidance_end=f)
    real = d["image"]
    split, sweep = [], []
    for name, x in samples.items():
        labels = judge.predict(x)
        lab_l, lab_r = _halves(labels)
        seg_l, seg_r = _halves(S_seg)
        img_l, img_r = _halves(x)
        sk_l, sk_r = _halves(S_sk)
        row = {"setting": name,
               "seg_miou_left": M.segmentation_alignment(lab_l, seg_l, 6)["miou"],
               "fg_iou_left": fg_iou(lab_l, seg_l), "fg_iou_right": fg_iou(lab_r, seg_r),
               "sketch_f1_right": M.sketch_alignment(img_r, sk_r)["f1"],
               "seg_miou": M.segmentation_alignment(labels, S_seg, 6)["miou"]}
        fid = M.judge_fid(judge)
        fid.update(real, real=True)
        fid.update(x, real=False)
        row["fid_judge"] = float(fid.compute())
        (sweep if "noisiest" in name or name in ("base alone", "MCM everywhere") else split).append(row)
        if name in ("base alone", "MCM everywhere"):
            split.append(row)
    out.mkdir(parents=True, exist_ok=True)
    k = min(8, len(seg))
    vis_seg = multi.modules[0].plugins["segmentation"].visualize(seg[:k]).cpu()
    vis_sk = multi.modules[0].plugins["sketch"].visualize(sketch[:k]).cpu()
    seed_note = f", seeds {seeds[0] * SEED_STRIDE}-{seeds[0] * SEED_STRIDE + k - 1}"
    split_rows = [("segmentation map", vis_seg), ("sketch", vis_sk)] + [
        (r["setting"] + seed_note, samples[r["setting"]][:k]) for r in split]
    sweep_rows = [("segmentation map", vis_seg)] + [(r["setting"] + seed_note, samples[r["setting"]][:k])
                                                    for r in sweep]
    for tag, rows in (("left_right", split_rows), ("schedule", sweep_rows)):
        labelled_grid(torch.cat([x for _, x in rows]), nrow=k, row_labels=[t for t, _ in rows],
                      min_tile=128).save(out / f"{tag}.png")
    report = {"n": len(seg), "seeds": seeds, "steps": STEPS, "left_right": split, "schedule": sweep}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "metrics.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    f = lambda v: "–" if v != v else f"{v:.3f}"  # noqa: E731 - NaN -> dash
    lines = ["| setting | seg mIoU, left | object IoU, left | object IoU, right (leak) | sketch F1, right | judge-FID |",
             "|---|---|---|---|---|---|"]
    for r in report["left_right"]:
        lines.append(f"| {r['setting']} | {f(r['seg_miou_left'])} | {f(r['fg_iou_left'])} | {f(r['fg_iou_right'])} | "
                     f"{f(r['sketch_f1_right'])} | {f(r['fid_judge'])} |")
    lines += ["", "| modulation on | seg mIoU (whole image) | judge-FID |", "|---|---|---|"]
    for r in report["schedule"]:
        lines.append(f"| {r['setting']} | {f(r['seg_miou'])} | {f(r['fid_judge'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="held-out shards (e.g. 'data/shapes/test-*.tar')")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="docs/eval/test/regional")
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(markdown(run(a.data, a.n, a.seeds, Path(a.out), a.device)))


if __name__ == "__main__":
    main()
