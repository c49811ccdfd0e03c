"""``mcm evaluate``: sample on held-out maps with fixed seeds, score every metric, write a report.

    mcm evaluate --modules shapes32 --data "data/shapes/val-*.tar" --n 256 --seeds 0 1 \\
        --strength 0 0.5 1 1.5 --out runs/eval/shapes32

For each setting (modality subset x strength) the MCM pipeline samples one image per held-out
condition and seed (image ``i`` of seed ``s`` starts from noise seed ``s * 100000 + i``, so
results do not depend on ``--batch-size``); judges read the samples back and the metrics of
``mcm.evaluation.metrics`` compare them with the input maps.  Written to ``--out``: ``metrics.json``
(stable keys, ``null`` where a metric does not apply), ``metrics.md``, sample grids and
plots (see ``mcm.evaluation.eval_report``).  ``--modules`` omitted = the base alone (alignment at chance
level: the reference every MCM is compared with); several ``--modules`` compose (MCDM).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from datamodules.devices import resolve_device

log = logging.getLogger(__name__)

#: every key of ``settings[i]["metrics"]``, in report order
METRIC_KEYS = ("seg_miou", "seg_pixel_acc", "partial_miou", "partial_pixel_acc", "sketch_f1", "sketch_precision",
               "sketch_recall", "depth_ssi_rmse", "depth_delta1", "fid_judge", "kid_judge", "fid_inception",
               "diversity", "clip_score")
BUILTIN_MODALITIES = ("segmentation", "sketch", "depth", "partial_mask")
SEED_STRIDE = 100_000  # noise seed of condition i under --seeds s: s * SEED_STRIDE + i


# ---- 1. models and judges -----------------------------------------------------------------------------
def build_pipeline(mcm: Sequence[str], base: str | None, weights: Sequence[float] | None, device: str):
    """An ``MCMPipeline`` of the base and the modules (none = the base alone)."""
    from mcm.pipelines import BASE_INFO_FILE, BUILTIN_MODULES, MCMPipeline

    if base is None:
        base = "shapes32"
        if mcm and mcm[0] not in BUILTIN_MODULES:
            info = Path(mcm[0]) / BASE_INFO_FILE
            if not info.is_file():
                raise FileNotFoundError(f"--modules {mcm[0]}: {info} is missing; "
                                        f"pass --base to say which base it modulates")
            base = json.loads(info.read_text())["source"]
    if weights and len(weights) != len(mcm):
        raise ValueError(f"--weights: got {len(weights)} weights for {len(mcm)} modules (--modules)")
    return MCMPipeline.from_pretrained(base, modules=list(mcm), weights=weights or None, device=device)


def load_judges(a: argparse.Namespace, num_classes: int | None = None, base_source: str = "shapes32"):
    """The ``Judges`` (a mapping ``{"segmentation", "depth", "features"}``, ``None`` when off): local models from
    ``--segmenter`` / ``--label-map`` / ``--depth-model``, else ``--seg-judge`` / ``--depth-judge``, else the ones
    shipped with the base (``shapes32``, by name or directory; other bases ship none: that judge is off).

    ``num_classes``: the modules' segmentation classes, checked against the label map or the segmenter."""
    from mcm.evaluation.judges.local_models import judges_from_args
    from mcm.models.base_loading import builtin_base_name

    judges = judges_from_args(a, num_classes, builtin_base_name(base_source))
    flags = {"segmentation": "seg_judge", "depth": "depth_judge"}
    off = [t for t, flag in flags.items() if judges[t] is None and getattr(a, flag, None) != "none"]  # not asked off
    if off:
        log.warning("no %s judge: the base '%s' ships none (judges ship with shapes32); give --segmenter / "
                    "--depth-model (local models, docs/judges.md) or --seg-judge / --depth-judge", " or ".join(off),
                    base_source)
    return judges


def segmentation_classes(modules) -> int | None:
    """``num_classes`` of the first module's segmentation (or partial-mask) plugin; ``None`` if none has one."""
    for m in modules:
        for name in ("segmentation", "partial_mask"):
            if name in m.plugins and getattr(m.plugins[name], "num_classes", None):
                return int(m.plugins[name].num_classes)
    return None


# ---- 2. held-out data -----------------------------------------------------------------------------------
def plugin_specs(pipe, judges: dict, names: Sequence[str]) -> dict[str, dict]:
    """Options for each modality's plugin: from the first module that has it, else defaults (K from the judge)."""
    specs: dict[str, dict] = {}
    for name in names:
        owner = next((m for m in pipe.modules if name in m.plugins), None)
        if owner is not None:
            specs[name] = owner.plugins[name].config()
        elif name in ("segmentation", "partial_mask") and judges["segmentation"] is not None \
                and judges["segmentation"].num_classes:
            specs[name] = {"num_classes": judges["segmentation"].num_classes}
        else:
            specs[name] = {}
    return specs


def available_modalities(shards: list[str]) -> list[str]:
    """Installed modalities the shards can provide (own key, a derivation key, or derivable from the image)."""
    import tarfile

    import modalities as registry
    from modalities import Modality

    local = shards[0].removeprefix("file:")
    if not Path(local).is_file():  # a remote URL: trust the request, decoding will name what is missing
        return registry.list_modalities()
    names: list[str] = []
    with tarfile.open(local) as tf:
        for member in tf:  # the first sample's members are enough: read headers lazily
            if member.isfile():
                names.append(member.name)
            if len(names) >= 32:
                break
    first = names[0].split(".", 1)[0] if names else ""
    keys = {n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == first and "." in n}
    out = []
    for name in registry.list_modalities():
        try:
            cls = registry.get_class(name)
        except Exception as e:  # a broken third-party plugin must not stop the evaluation of others
            log.warning("modality plugin '%s' cannot be loaded, skipped: %s", name, e)
            continue
        # from the image alone (sketch); segmentation / depth derive only with a local model (needs_annotator)
        derivable = (cls.derive is not Modality.derive and not cls.derive_keys
                     and not getattr(cls, "needs_annotator", False))
        if keys & set(cls.shard_keys + cls.derive_keys) or derivable:
            out.append(name)
    return out


def load_data(shards: str, specs: dict[str, dict], image_size: int, n: int) -> dict[str, Any]:
    """The first ``n`` held-out samples: ``image`` ``(N,3,S,S)`` in [0,1], raw maps by modality, ``caption``."""
    from datamodules.shard_datamodule import ShardDataModule, count_samples, expand_shards

    urls = expand_shards(shards, "--data")
    available = count_samples(urls, "--data") if not any("://" in u or u.startswith("pipe:") for u in urls) else n
    if available < n:
        log.warning("--n %d but the shards hold %d samples: evaluating %d", n, available, available)
        n = available
    if n < 1:
        raise ValueError(f"--data {shards!r}: no samples to evaluate")
    dm = ShardDataModule(val_shards=shards, modalities=specs, image_size=image_size, batch_size=min(n, 32),
                         num_workers=0, val_samples=n)
    batches = []
    for batch in dm.val_dataloader():
        batches.append(batch)
        if sum(len(b["key"]) for b in batches) >= n:
            break
    return collate_heldout(batches, list(specs), n)


def collate_heldout(batches: Sequence[dict], names: Sequence[str], n: int) -> dict[str, Any]:
    """The first ``n`` samples of data-module batches as evaluation data (also the alignment callback's):
    ``image`` ``(N,3,S,S)`` in [0,1] (batches hold [-1,1]), raw maps of ``names``, ``caption``, ``key``."""
    data: dict[str, Any] = {"caption": [c for b in batches for c in b["caption"]][:n],
                            "key": [k for b in batches for k in b["key"]][:n],
                            "image": ((torch.cat([b["image"] for b in batches])[:n] + 1) / 2).clamp(0, 1)}
    for name in names:
        data[name] = torch.cat([b[name] for b in batches])[:n]
    return data


# ---- 3. settings and sampling ----------------------------------------------------------------------------
def make_settings(pipe, a: argparse.Namespace, available: Sequence[str]) -> list[dict]:
    """``[{"modalities": [...], "strength": s}]``: the subset(s) x strengths to evaluate."""
    trained = [n for m in pipe.modules for n in m.modality_names]
    trained = list(dict.fromkeys(trained))
    if a.modalities:
        mods = [x for arg in a.modalities for x in arg.split(",") if x]
        if pipe.modules:
            missing = sorted(set(mods) - set(trained))
            if missing:
                raise ValueError(f"--modalities {missing}: no --modules module was trained on them (they know {trained})")
    else:
        mods = trained if pipe.modules else [m for m in BUILTIN_MODALITIES if m in available]
    lacking = sorted(set(mods) - set(available))
    if lacking:
        raise ValueError(f"--modalities {lacking}: the --data shards cannot provide them "
                         f"(they provide {list(available)})")
    subsets = [[m] for m in mods] + ([mods] if len(mods) > 1 else []) if a.per_modality else [mods]
    strengths = a.strength if pipe.modules else [0.0]  # the base alone has nothing to modulate
    if strengths is None:  # each module's recorded default_strength: one number, to label the setting
        defaults = sorted({m.default_strength for m in pipe.modules})
        if len(defaults) > 1:
            raise ValueError(f"--strength: the --modules modules record different default strengths {defaults}; "
                             f"give --strength explicitly")
        strengths = defaults
    return [{"modalities": list(s), "strength": float(st)} for s in subsets for st in strengths]


def conditions_for(pipe, data: dict, modalities: Sequence[str], idx: slice) -> list[dict]:
    """One conditions dict per module (each gets the modalities it knows), for the conditions ``idx``."""
    return [{n: data[n][idx] for n in modalities if n in m.plugins} for m in pipe.modules]


@torch.no_grad()
def generate(pipe, data: dict, setting: dict, a: argparse.Namespace, progress) -> torch.Tensor:
    """Samples ``(S, N, 3, H, W)`` in [0, 1]: seed ``s``, condition ``i`` starts from noise seed ``s*100000+i``.

    Each setting's strength is a float, times ``--strength-map`` / ``--strength-schedule`` when given."""
    from mcm.evaluation.strength_args import strength_from_args
    from mcm.pipelines.pipeline import window_arguments

    N = data["image"].shape[0]
    text = pipe.base.is_text_conditional and a.prompts == "caption"
    out = []
    for s in a.seeds:
        chunks = []
        for start in range(0, N, a.batch_size):
            idx = slice(start, min(start + a.batch_size, N))
            B = idx.stop - idx.start
            conds = conditions_for(pipe, data, setting["modalities"], idx) if pipe.modules else {}
            seeds = [s * SEED_STRIDE + i for i in range(idx.start, idx.stop)]
            chunks.append(pipe(conditions=conds, prompt=data["caption"][idx] if text else None,
                               num_images=None if any(c for c in conds) else B,
                               num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
                               conditioning_scale=strength_from_args(a, setting["strength"]),
                               **window_arguments(getattr(a, "window", (0.0, 1.0))), seeds=seeds,
                               output_type="pt").images.float().cpu())
            progress.update(1)
        out.append(torch.cat(chunks))
    return torch.stack(out)


# ---- 4. scores ------------------------------------------------------------------------------------------------
def _clean(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6) + 0.0  # + 0.0: no "-0.0"


@torch.no_grad()
def score(images: torch.Tensor, data: dict, setting: dict, specs: dict, judges: dict, extras: dict,
          a: argparse.Namespace) -> dict[str, float | None]:
    """Every metric of ``METRIC_KEYS`` for samples ``(S, N, 3, H, W)``; ``None`` where it does not apply."""
    from mcm.evaluation import metrics as M
    from modalities.annotators import IGNORE

    S, N = images.shape[:2]
    flat = images.reshape(S * N, *images.shape[2:])  # (S*N, 3, H, W), seed-major
    rep = lambda x: x.repeat(S, *[1] * (x.ndim - 1))  # noqa: E731 - maps for every seed
    mods, out = setting["modalities"], dict.fromkeys(METRIC_KEYS)
    seg_judge, depth_judge = judges["segmentation"], judges["depth"]
    labels = None
    if seg_judge is not None and {"segmentation", "partial_mask"} & set(mods):
        labels = torch.cat([seg_judge.predict(flat[i:i + 256]) for i in range(0, len(flat), 256)])
    K = seg_judge.num_classes if seg_judge is not None else None
    if labels is not None and "segmentation" in mods:
        # pixels the judge gives a class its label map ignores (255) count as wrong: none of the map's classes
        target = rep(data["segmentation"]).long()
        r = M.segmentation_alignment(labels, target, specs["segmentation"].get("num_classes", K), pred_other=IGNORE)
        out["seg_miou"], out["seg_pixel_acc"] = r["miou"], r["pixel_acc"]
    if labels is not None and "partial_mask" in mods:
        target = rep(data["partial_mask"]).long()  # 255 = unknown: those pixels are skipped
        r = M.partial_alignment(labels, target, specs["partial_mask"].get("num_classes", K), pred_other=IGNORE)
        out["partial_miou"], out["partial_pixel_acc"] = r["miou"], r["pixel_acc"]
    if "sketch" in mods:
        import modalities

        plugin = modalities.get("sketch", **specs["sketch"])  # the detector settings that made the input sketches
        opts = {k: getattr(plugin, k, None) for k in ("low_threshold", "high_threshold", "sigma")}
        r = M.sketch_alignment(flat, rep(data["sketch"]), a.sketch_tolerance, **opts)
        out["sketch_f1"], out["sketch_precision"], out["sketch_recall"] = r["f1"], r["precision"], r["recall"]
    if depth_judge is not None and "depth" in mods:
        pred = torch.cat([depth_judge.predict(flat[i:i + 256]) for i in range(0, len(flat), 256)])
        r = M.depth_alignment(pred, rep(data["depth"]))
        out["depth_ssi_rmse"], out["depth_delta1"] = r["ssi_rmse"], r["delta1"]
    real = data["image"]
    if judges["features"] is not None and judges["features"].has_features and N >= 2:
        fid = M.judge_fid(judges["features"])
        kid = M.judge_kid(judges["features"], subset_size=min(1000, N), subsets=100)
        for m in (fid, kid):
            m.update(real, real=True)
            m.update(flat, real=False)
        out["fid_judge"], out["kid_judge"] = fid.compute(), kid.compute()[0]
    if extras.get("inception") is not None and N >= 2:
        inc = extras["inception"]
        inc.reset()
        inc.update(real, real=True)
        inc.update(flat, real=False)
        out["fid_inception"] = inc.compute()
    if S >= 2:
        out["diversity"] = M.diversity(images)
    if extras.get("clip") is not None:
        model, tok = extras["clip"]
        out["clip_score"] = M.clip_score(model, tok, flat, data["caption"] * S)
    return {k: None if v is None else _clean(v) for k, v in out.items()}


# ---- 5. the command ---------------------------------------------------------------------------------------
def check_args(a: argparse.Namespace) -> None:
    for name in ("n", "steps", "batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(a, name)}")
    if len(set(a.seeds)) != len(a.seeds):
        raise ValueError(f"--seeds {a.seeds}: repeated seeds would repeat samples (and fake zero diversity)")
    if a.sketch_tolerance < 0:
        raise ValueError(f"--sketch-tolerance: expected >= 0 pixels, got {a.sketch_tolerance}")
    if bool(a.clip_checkpoint) != bool(a.clip_arch):
        raise ValueError("--clip-arch and --clip-checkpoint go together "
                         "(an open_clip architecture and its local weights)")


def run_evaluate(a: argparse.Namespace) -> dict:
    """Evaluate every setting, write the report to ``a.out``, return the ``metrics.json`` content."""
    from tqdm.auto import tqdm

    from mcm.evaluation import eval_report
    from mcm.evaluation.metrics import inception_fid, load_open_clip

    check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = build_pipeline(a.mcm, a.base, a.weights, a.device)
    if a.guidance_scale is None:  # the family pipeline's default, recorded in the report as used
        a.guidance_scale = pipe.base.default_guidance_scale
    judges = load_judges(a, segmentation_classes(pipe.modules), str(pipe.base.source))
    from datamodules.shard_datamodule import expand_shards

    available = available_modalities(expand_shards(a.data, "--data"))
    settings = make_settings(pipe, a, available)
    names = list(dict.fromkeys(n for s in settings for n in s["modalities"]))
    specs = plugin_specs(pipe, judges, names)
    size = pipe.base.unet.config.sample_size
    size = (size if isinstance(size, int) else size[0]) * pipe.base.downsample
    data = load_data(a.data, specs, size, a.n)
    N = data["image"].shape[0]
    extras = {"inception": inception_fid(a.inception_weights) if a.inception_weights else None,
              "clip": load_open_clip(a.clip_arch, a.clip_checkpoint, a.clip_config) if a.clip_checkpoint else None}
    results, cache = [], {}
    chunks = len(a.seeds) * -(-N // a.batch_size)
    with tqdm(total=len(settings) * chunks, desc="mcm evaluate", unit="batch") as progress:
        for setting in settings:
            key = (tuple(setting["modalities"]), setting["strength"]) if pipe.modules else ()
            if key not in cache:
                cache = {key: generate(pipe, data, setting, a, progress)}  # keep one: the base alone reuses it
            else:
                progress.update(chunks)
            images = cache[key]
            metrics = score(images, data, setting, specs, judges, extras, a)
            results.append({"mcm": [str(m) for m in a.mcm], "weights": list(pipe.weights), **setting,
                            "metrics": metrics})
            eval_report.save_setting_grid(out, len(results) - 1, results[-1], images, data, pipe, specs)
            progress.set_postfix_str(eval_report.short_summary(metrics))
    # judge ceiling: the held-out images themselves, scored as if generated (FID 0, no diversity)
    reference = {"modalities": names, "metrics": score(data["image"][None], data, {"modalities": names}, specs, judges,
                                                       extras, a)}
    report = {
        "version": 1, "base": str(pipe.base.source), "data": a.data, "n": N, "seeds": list(a.seeds),
        "steps": a.steps, "guidance_scale": a.guidance_scale, "prompts": a.prompts,
        "sketch_tolerance": a.sketch_tolerance,
        "judges": {k: (j.name if j is not None else None) for k, j in judges.items()},
        "judge_label_map": getattr(judges, "label_map", None),
        "settings": results,
        "reference": reference,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    eval_report.write_all(out, report, curves=a.curve)
    log.info("mcm evaluate: %d settings x %d images x %d seeds in %.1f s -> %s", len(settings), N, len(a.seeds),
             time.time() - t0, out)
    return report


def _run(a: argparse.Namespace) -> int:
    if a.data is None:  # only plot curves from earlier runs
        if not a.curve:
            raise SystemExit("mcm evaluate: pass --data SHARDS to evaluate, or --curve N=metrics.json ... to plot")
        from mcm.evaluation import eval_report

        Path(a.out).mkdir(parents=True, exist_ok=True)
        curves = eval_report.parse_curves(a.curve)
        eval_report.plot_data_curve(curves, Path(a.out) / "alignment_vs_train_images.png")
        (Path(a.out) / "alignment_vs_train_images.md").write_text(eval_report.curve_table(curves))
        return 0
    run_evaluate(a)
    return 0


def add_module_args(p) -> None:
    """``--modules`` (``--mcm`` the earlier name), ``--weights`` and ``--base``: the modules a command samples."""
    p.add_argument("--modules", "--mcm", dest="mcm", nargs="*", default=[],
                   help="exported MCM/ControlNet dirs or built-in names such as 'shapes32' (none: the base alone; "
                   "several: composed); --mcm is the earlier name")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="composition weight per --modules (default 1)")
    p.add_argument("--base", default=None,
                   help="base model (default: the one the first --modules names, else shapes32)")


def add_command(sub) -> None:
    p = sub.add_parser("evaluate", help="sample on held-out maps and score alignment, quality, diversity",
                       description=__doc__.split("\n\n")[0])
    add_module_args(p)
    p.add_argument("--data", default=None, help="held-out shards: path, glob or brace pattern")
    p.add_argument("--n", type=int, default=64, help="held-out conditions (default 64)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="noise seeds per condition (default 0 1)")
    p.add_argument("--conditioning-scale", "--strength", dest="strength", nargs="+", type=float, default=None,
                   help="modulation strengths to sweep (default: the modules' recorded default_strength)")
    from mcm.evaluation.strength_args import add_strength_args

    add_strength_args(p)
    p.add_argument("--modalities", nargs="+", default=None,
                   help="the subset to condition on (default: every modality of the modules; "
                   "base alone: all available)")
    p.add_argument("--per-modality", action="store_true", help="also evaluate each modality alone (and all together)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25, DDIM)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the base family pipeline's own)")
    p.add_argument("--prompts", choices=("caption", "empty"), default="caption",
                   help="text-conditional bases: condition on the held-out captions or on '' (default caption)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seg-judge", default=None,
                   help="judge name, dir, config or pkg.mod:attr; 'none' = off (default: the base's shipped judge, "
                        "shapes32-segmentation for shapes32; other bases: off)")
    p.add_argument("--depth-judge", default=None,
                   help="as --seg-judge, for depth; 'none' = off (default: shapes32-depth for shapes32; other bases: "
                        "off)")
    p.add_argument("--feature-judge", default=None,
                   help="judge whose features() FID/KID use (default: the segmentation judge)")
    p.add_argument("--segmenter", default=None, metavar="DIR",
                   help="local transformers segmenter (save_pretrained dir: config.json, model.safetensors, "
                   "preprocessor_config.json) judging segmentation instead of --seg-judge; see docs/judges.md")
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help="JSON/YAML: --segmenter's labels -> the module's class ids (unmapped -> 0; 'ignore')")
    p.add_argument("--depth-model", default=None, metavar="DIR",
                   help="local transformers depth model (save_pretrained dir) judging depth instead of --depth-judge")
    p.add_argument("--depth-kind", choices=("auto", "inverse", "metric"), default="auto",
                   help="how --depth-model's output is read: inverse depth (DPT, Depth Anything) or metric "
                   "(default auto: from the model type)")
    p.add_argument("--sketch-tolerance", type=int, default=1, help="edge match distance in pixels (default 1)")
    p.add_argument("--inception-weights", default=None,
                   help="local torch-fidelity Inception weights file: adds fid_inception")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture for clip_score")
    p.add_argument("--clip-checkpoint", default=None, help="local open_clip checkpoint (never downloaded)")
    p.add_argument("--clip-config", default=None, help="JSON model config registering a custom --clip-arch")
    p.add_argument("--curve", nargs="+", default=None, metavar="N=METRICS_JSON",
                   help="plot alignment and FID vs number of training images from earlier runs")
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_run)
