"""Alignment at varying sketch detail and from soft segmentation maps (issue #17 item 6).

    python -m mcm.evaluation.detail_levels --mcm shapes32 --data "data/shapes/val-*.tar" --n 32 \\
        --out runs/eval/detail_levels

MCM (Ham et al. 2023) takes "hard or soft segmentation maps and sketches with varying levels of
detail".  This measures a module on held-out images, with ``mcm evaluate``'s functions (same seeds,
judges and metrics):

* sketch F1 at three detail levels: the held-out images' sketches drawn by the Canny detector at a
  sparse, the module's own (default) and a dense threshold pair; the generated images' edges are
  detected at the same pair, so each level is scored as the detector drew its input;
* segmentation mIoU from the hard label maps and from soft ones (their one-hot blurred by a gaussian of
  ``--soft-sigma`` pixels, rows still summing to 1: label smoothing at boundaries); both are scored
  against the hard maps.

Written to ``--out``: ``detail_levels.json`` and ``detail_levels.md``.  Every other option of
``mcm evaluate`` (``--steps``, ``--seeds``, ``--strength``, judges, ...) is accepted and passed on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

#: (name, low, high); "default" is replaced by the module's sketch plugin's own pair
DEFAULT_LEVELS = (("sparse", 0.45, 0.9), ("default", None, None), ("dense", 0.15, 0.3))


def _evaluate_args(argv: Sequence[str]) -> argparse.Namespace:
    """``mcm evaluate``'s namespace for ``argv`` (its defaults for everything not given)."""
    from mcm.evaluation import evaluate

    parser = argparse.ArgumentParser(prog="mcm")
    evaluate.add_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["evaluate", *argv])


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This command's own options, and ``mcm evaluate``'s namespace for the rest of ``argv``."""
    own = argparse.ArgumentParser(prog="python -m mcm.evaluation.detail_levels", description=__doc__.split("\n\n")[0],
                                  epilog="Other options are mcm evaluate's (python -m mcm evaluate --help).")
    own.add_argument("--soft-sigma", nargs="+", type=float, default=[1.0],
                     help="gaussian sigma(s) in pixels of the soft segmentation maps (default 1.0)")
    own.add_argument("--level", nargs=3, action="append", metavar=("NAME", "LOW", "HIGH"), default=None,
                     help="a sketch detail level (repeatable; default: sparse 0.45 0.9, the module's pair, "
                     "dense 0.15 0.3)")
    a, rest = own.parse_known_args(list(argv))
    if any(s <= 0 for s in a.soft_sigma):
        raise ValueError(f"--soft-sigma: expected positive sigmas, got {a.soft_sigma}")
    return a, _evaluate_args(rest)


def levels_for(plugin_config: dict, requested: Sequence[Sequence[str]] | None) -> list[tuple[str, float, float]]:
    """``(name, low, high)`` Canny pairs; "default" = the sketch plugin's own pair."""
    if requested:
        out = []
        for name, lo, hi in requested:
            lo_f, hi_f = float(lo), float(hi)
            if not 0 < lo_f < hi_f:
                raise ValueError(f"--level {name} {lo} {hi}: need 0 < LOW < HIGH")
            out.append((name, lo_f, hi_f))
        return out
    pair = (plugin_config.get("low_threshold", 0.3), plugin_config.get("high_threshold", 0.6))
    return [(n, *(pair if lo is None else (lo, hi))) for n, lo, hi in DEFAULT_LEVELS]


def soft_segmentation(labels: torch.Tensor, num_classes: int, sigma: float) -> torch.Tensor:
    """``(B, H, W)`` labels -> ``(B, K, H, W)`` probabilities: the one-hot blurred by a gaussian of ``sigma``."""
    from modalities.segmentation import blur_maps

    onehot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    return blur_maps(onehot, sigma)


def run_detail_levels(a: argparse.Namespace, ev: argparse.Namespace) -> dict:
    """Score every detail level and the hard / soft segmentation maps; write and return the report."""
    from tqdm.auto import tqdm

    from mcm.evaluation import evaluate as E
    from modalities.sketch import detect_edges

    E.check_args(ev)
    if ev.threads:
        torch.set_num_threads(ev.threads)
    out = Path(ev.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = E.build_pipeline(ev.mcm, ev.base, ev.weights, ev.device)
    trained = [n for m in pipe.modules for n in m.modality_names]
    names = [n for n in ("segmentation", "sketch") if n in trained]
    if not names:
        raise ValueError(f"--mcm {ev.mcm}: the modules know {trained}; this measures 'segmentation' and 'sketch'")
    judges = E.load_judges(ev, E.segmentation_classes(pipe.modules), str(pipe.base.source))
    specs = E.plugin_specs(pipe, judges, names)
    size = pipe.base.unet.config.sample_size
    size = (size if isinstance(size, int) else size[0]) * pipe.base.downsample
    data = E.load_data(ev.data, specs, size, ev.n)
    N = data["image"].shape[0]
    strength = ev.strength[0] if ev.strength else pipe.modules[0].default_strength
    if ev.strength and len(ev.strength) > 1:
        log.warning("--strength %s: this command uses the first, %s", ev.strength, strength)
    rows: list[dict] = []
    levels = levels_for(specs["sketch"], a.level) if "sketch" in names else []
    chunks = len(ev.seeds) * -(-N // ev.batch_size)
    runs = len(levels) + (1 + len(a.soft_sigma)) * ("segmentation" in names)
    with tqdm(total=runs * chunks, desc="detail levels", unit="batch") as progress:
        for name, lo, hi in levels:  # 1. sketches from sparse to dense
            sketches = detect_edges(data["image"], lo, hi, specs["sketch"].get("sigma", 1.0))
            d, setting = {**data, "sketch": sketches}, {"modalities": ["sketch"], "strength": float(strength)}
            level_specs = {**specs, "sketch": {**specs["sketch"], "low_threshold": lo, "high_threshold": hi}}
            images = E.generate(pipe, d, setting, ev, progress)
            m = E.score(images, d, setting, level_specs, judges, {}, ev)
            rows.append({"modality": "sketch", "input": name, "low_threshold": lo, "high_threshold": hi,
                         "edge_density": round(float(sketches.mean()), 6), "sketch_f1": m["sketch_f1"],
                         "sketch_precision": m["sketch_precision"], "sketch_recall": m["sketch_recall"]})
        if "segmentation" in names:  # 2. hard maps, then soft ones; scored against the hard maps
            K = specs["segmentation"].get("num_classes", 6)
            setting = {"modalities": ["segmentation"], "strength": float(strength)}
            for sigma in [None, *a.soft_sigma]:
                cond = data if sigma is None else {**data, "segmentation": soft_segmentation(data["segmentation"],
                                                                                            K, sigma)}
                images = E.generate(pipe, cond, setting, ev, progress)
                m = E.score(images, data, setting, specs, judges, {}, ev)
                rows.append({"modality": "segmentation", "input": "hard" if sigma is None else f"soft sigma={sigma:g}",
                             "soft_sigma": sigma, "seg_miou": m["seg_miou"], "seg_pixel_acc": m["seg_pixel_acc"]})
    report = {"mcm": [str(m) for m in ev.mcm], "base": str(pipe.base.source), "data": ev.data, "n": N,
              "seeds": list(ev.seeds), "steps": ev.steps, "strength": float(strength),
              "sketch_tolerance": ev.sketch_tolerance, "rows": rows}
    (out / "detail_levels.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "detail_levels.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as two small tables."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Detail levels: {', '.join(report['mcm'])}", "",
             (f"{report['n']} held-out images of `{report['data']}`, seeds {report['seeds']}, {report['steps']} "
              f"steps, strength {report['strength']:g}."), ""]
    sk = [r for r in report["rows"] if r["modality"] == "sketch"]
    if sk:
        lines += ["| sketch | Canny (low, high) | edge density | F1 | precision | recall |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['input']} | ({r['low_threshold']:g}, {r['high_threshold']:g}) | {fmt(r['edge_density'])} | "
                  f"{fmt(r['sketch_f1'])} | {fmt(r['sketch_precision'])} | {fmt(r['sketch_recall'])} |" for r in sk]
        lines.append("")
    seg = [r for r in report["rows"] if r["modality"] == "segmentation"]
    if seg:
        lines += ["| segmentation input | mIoU | pixel acc |", "|---|---|---|"]
        lines += [f"| {r['input']} | {fmt(r['seg_miou'])} | {fmt(r['seg_pixel_acc'])} |" for r in seg]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a, ev = parse_args(sys.argv[1:] if argv is None else argv)
    if ev.data is None:
        raise SystemExit("detail_levels: --data SHARDS is required")
    report = run_detail_levels(a, ev)
    log.info("detail levels -> %s\n%s", ev.out, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
