"""``AlignmentCallback``: alignment measured while training, next to the loss (issue #17, item 4).

The loss says little about control: a module can lower it while ignoring its maps.  So at the end of
every ``every_n_validations``-th validation run (rank 0, never during the sanity check) this callback
samples a FIXED held-out set (the first ``num_samples`` samples of the validation data, taken at the
first validation and kept) with the current adapter (its EMA weights when EMA is on:
``pl_module.exported_module()``), fixed seeds and ``steps`` DDIM steps, judges the samples and logs::

    align/seg_miou  align/partial_miou  align/sketch_f1  align/depth_delta1  align/depth_ssi_rmse  align/fid_judge

(those that apply to the module's modalities and judges) with ``pl_module.log`` (the step and row of
``val/loss``), plus one labelled grid (``align/samples``: conditions, then one row per setting).  Sampling and
scores are :mod:`mcm.evaluation.evaluate`'s own functions (``make_settings``, ``generate``, ``score``),
so a logged number equals what ``mcm evaluate --modules EXPORT --n N --seeds SEED --steps STEPS
--strength S`` gives for an export of the same weights.

Settings: by default one, all the module's modalities together at one strength (``align/<metric>``).
``per_modality=True`` adds each modality alone, as ``mcm evaluate --per-modality``
(``align/<metric>/<modality>_alone``); several ``strength`` values add ``.../s<strength>`` keys for all
but the first.  Each setting costs one sampling run, so per-modality multiplies the cost by M + 1.

Judges: ``judges`` holds :func:`mcm.evaluation.judges.local_models.build_judges`' options: local
``transformers`` models (``segmenter: DIR``, ``label_map: FILE``, ``depth_model: DIR``, ``depth_kind``) or
``load_judge`` specs (``seg_judge``, ``depth_judge``, ``feature_judge``: a built-in name, a judge directory, an
import path, ``"none"`` = off).  Left out, a base's shipped judges are used (only ``shapes32`` ships them); with
no judge at all a warning says so once and only ``sketch_f1`` (an edge detector, no learned judge) is logged.

It lives in ``mcm/cli`` because it joins the two layer-3 packages, training (``log_image_grid``) and
evaluation (sampling and scores), which may not import each other (docs/architecture.md).

Cost, measured on the multimodal ``shapes32`` job (2 CPU cores shared with other training runs, so noisy;
``AlignmentCallback().measure(module, data)`` timed in one process alternately with training steps of batch 32;
every run logs its own ``time/alignment_s``): one call with the defaults (32 maps x 20 DDIM steps, one setting, the judges' passes) took
as long as 5.6-20.8 training steps over six rounds, median 11, i.e. ~8 s at the job's 0.75 s per step.  At
``every_n_validations=1`` and validation every 400 steps a 20-minute run (<= 1600 steps) validates at most
4 times: ~33 s, ~3% of the run (5% at the worst ratio measured).  ``per_modality=True`` samples M + 1 = 5
settings, ~15%: not the default.  Judges are loaded once per run.
"""
from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from mcm.evaluation import evaluate as E
from mcm.pipelines.grids import adapter_display_name
from mcm.training.image_logging import log_image_grid

log = logging.getLogger(__name__)

#: the scores this callback logs (of ``mcm evaluate``'s ``METRIC_KEYS``)
ALIGN_KEYS = ("seg_miou", "partial_miou", "sketch_f1", "depth_delta1", "depth_ssi_rmse", "fid_judge")
TIME_KEY = "time/alignment_s"  # seconds one measurement took
JUDGE_TASKS = ("segmentation", "depth", "features")
#: keys of the ``judges`` option: ``build_judges``' keyword arguments
JUDGE_OPTIONS = ("segmenter", "label_map", "depth_model", "depth_kind", "seg_judge", "depth_judge", "feature_judge")


class AlignmentCallback(L.Callback):
    """Sample a fixed held-out set at the end of validation, judge it, log ``<prefix>/<metric>`` scalars.

    Args:
        every_n_validations: measure at the N-th, 2N-th, ... validation run of the trainer.
        num_samples: held-out conditions: the first ``num_samples`` of the validation data (fewer if it holds
            fewer; with DDP, of rank 0's share).
        steps: DDIM sampling steps.
        strength: modulation strength(s); ``None`` = the module's ``val_strength`` (what its grids show), else
            the adapter's ``default_strength``.  A list evaluates each (one sampling run per value).
        seed: noise seed: condition ``i`` starts from seed ``seed * 100000 + i`` (``mcm evaluate --seeds``).
        modalities: the modalities to condition on together (``None`` = all of the module's).
        per_modality: also sample each modality alone (``mcm evaluate --per-modality``).
        guidance_scale: ``None`` = the module's ``val_guidance_scale`` (its base family's default if it has none).
        batch_size: images per sampling call.
        judges: ``build_judges`` options (``segmenter``, ``label_map``, ``depth_model``, ``seg_judge``, ...),
            see the module docstring; ``None`` = the base's shipped judges, if any.
        sketch_tolerance: edge match distance in pixels for ``sketch_f1``.
        grid_samples: columns of the logged grid (0 = no grid).
        prefix: the scalars' namespace (two instances with different settings need different prefixes).
    """

    def __init__(self, every_n_validations: int = 1, num_samples: int = 32, steps: int = 20,
                 strength: float | list[float] | None = None, seed: int = 0, modalities: list[str] | None = None,
                 per_modality: bool = False, guidance_scale: float | None = None, batch_size: int = 32,
                 judges: dict[str, Any] | None = None, sketch_tolerance: int = 1, grid_samples: int = 8,
                 prefix: str = "align"):
        for name, value, low in (("every_n_validations", every_n_validations, 1), ("num_samples", num_samples, 1),
                                 ("steps", steps, 1), ("batch_size", batch_size, 1),
                                 ("sketch_tolerance", sketch_tolerance, 0), ("grid_samples", grid_samples, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"AlignmentCallback({name}={value!r}): expected an integer >= {low}")
        if judges is not None:
            unknown = sorted(set(judges) - set(JUDGE_OPTIONS))
            if unknown:
                raise ValueError(f"AlignmentCallback(judges=...): unknown option(s) {unknown}; expected keys among "
                                 f"{list(JUDGE_OPTIONS)}")
        self.every_n_validations, self.num_samples, self.steps = every_n_validations, num_samples, steps
        self.strength = [float(strength)] if isinstance(strength, (int, float)) else (
            [float(s) for s in strength] if strength is not None else None)
        self.seed, self.modalities, self.per_modality = seed, list(modalities) if modalities else None, per_modality
        self.guidance_scale, self.batch_size, self.judges = guidance_scale, batch_size, judges
        self.sketch_tolerance, self.grid_samples, self.prefix = sketch_tolerance, grid_samples, prefix
        self.validations = 0  # validation runs seen (checkpointed: a resumed run skips the same ones)
        self._batches: list[dict] = []
        self._data: dict[str, Any] | None = None
        self._loaded_judges: dict[str, Any] | None = None

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        names = list(getattr(pl_module, "modality_names", None) or [])
        if not hasattr(pl_module, "exported_module") or not hasattr(pl_module, "base"):
            raise ValueError(f"AlignmentCallback: the model {type(pl_module).__name__} is not an adapter module "
                             f"(an mcm.training AdapterModule with base and exported_module())")
        # rank 0 alone scores the held-out set: nothing to sync, so Lightning's advice to sync is noise here
        for key in (re.escape(self.prefix) + "/", re.escape(TIME_KEY)):
            warnings.filterwarnings("ignore", message=rf"It is recommended to use `self.log\('{key}",
                                    category=PossibleUserWarning)
        missing = sorted(set(self.modalities or []) - set(names))
        if missing:
            raise ValueError(f"AlignmentCallback(modalities={self.modalities}): {missing} are not modalities of "
                             f"the module (it has {names})")

    # ---- the held-out set: the first validation batches, once ------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._data is not None or trainer.sanity_checking or not trainer.is_global_zero or dataloader_idx:
            return
        if sum(len(b["image"]) for b in self._batches) >= self.num_samples:
            return
        if "image" not in batch:
            raise ValueError(f"AlignmentCallback: validation batches have no 'image' (keys {sorted(batch)}); "
                             f"the held-out set compares samples with the real images")
        keep = ["image", *[n for n in pl_module.modality_names if n in batch]]
        b = {k: batch[k].detach().cpu().clone() for k in keep}
        B = b["image"].shape[0]
        b["caption"] = list(batch["caption"]) if batch.get("caption") is not None else [""] * B
        b["key"] = list(batch["key"]) if batch.get("key") is not None else [f"val{batch_idx}_{i}" for i in range(B)]
        self._batches.append(b)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if not trainer.is_global_zero:
            return
        if self._data is None and self._batches:
            names = [n for n in pl_module.modality_names if n in self._batches[0]]
            self._data = E.collate_heldout(self._batches, names, self.num_samples)
            self._batches = []
        if self.validations % self.every_n_validations or self._data is None:
            return
        if hasattr(pl_module, "sampling_base") and not pl_module.sampling_base():
            return  # a base-free run whose denoiser's weights are absent: the module warned once
        t0 = time.perf_counter()
        metrics, images, labels = self.measure(pl_module, self._data)
        metrics[TIME_KEY] = time.perf_counter() - t0
        # through Lightning's logging: the same step (and wandb row) as val/loss; float64, as scored
        pl_module.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}, on_step=False,
                           on_epoch=True, batch_size=1, rank_zero_only=True)
        if self.grid_samples and images:
            self._log_grid(pl_module, images, labels)
        log.info("alignment at step %d: %s", trainer.global_step,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # ---- one measurement ---------------------------------------------------------------------------------
    def options(self, pl_module) -> argparse.Namespace:
        """The ``mcm evaluate`` arguments this callback stands for."""
        h = getattr(pl_module, "hparams", {})
        strength = self.strength
        if strength is None:
            val = h.get("val_strength") if hasattr(h, "get") else None
            strength = [float(val)] if val is not None else None  # None: the adapter's default_strength
        guidance = self.guidance_scale if self.guidance_scale is not None else \
            float(getattr(pl_module, "val_guidance_scale", None) or 1.0)  # the module's, else its family's
        return argparse.Namespace(modalities=self.modalities, per_modality=self.per_modality, strength=strength,
                                  seeds=[self.seed], steps=self.steps, guidance_scale=guidance, prompts="caption",
                                  batch_size=self.batch_size, window=(0.0, 1.0), sketch_tolerance=self.sketch_tolerance)

    def measure(self, pl_module, data: dict) -> tuple[dict[str, float], list[torch.Tensor], list[str]]:
        """Scores of every setting as ``{<prefix>/<metric>[/<setting>]: value}``, the samples ``(N, 3, H, W)``
        in [0, 1] of each setting and its grid label."""
        from tqdm.auto import tqdm

        from mcm.pipelines import MCMPipeline

        base, module = pl_module.base, pl_module.exported_module()
        judges = self._judges(pl_module)
        a = self.options(pl_module)
        scheduler, was_training = base.scheduler, module.training
        module.eval()
        try:
            pipe = MCMPipeline.from_base(base, [module])  # DDIM, as mcm evaluate
            pipe.set_progress_bar_config(disable=True)
            settings = E.make_settings(pipe, a, [n for n in module.modality_names if n in data])
            names = list(dict.fromkeys(n for s in settings for n in s["modalities"]))
            specs = E.plugin_specs(pipe, judges, names)
            strengths = list(dict.fromkeys(s["strength"] for s in settings))
            out, images, labels = {}, [], []
            for setting in settings:
                samples = E.generate(pipe, data, setting, a, tqdm(disable=True))  # (1, N, 3, H, W)
                scores = E.score(samples, data, setting, specs, judges, {}, a)
                suffix = self._suffix(setting, names, strengths)
                out.update({f"{self.prefix}/{k}{suffix}": scores[k] for k in ALIGN_KEYS if scores[k] is not None})
                images.append(samples[0])
                alone = "all" if setting["modalities"] == names else "+".join(setting["modalities"]) + " alone"
                labels.append(f"{adapter_display_name(module)}: {alone}, strength {setting['strength']:g}")
        finally:
            base.scheduler = scheduler  # the pipeline set the base's scheduler to its DDIM one
            module.train(was_training)
        return out, images, labels

    @staticmethod
    def _suffix(setting: dict, names: list[str], strengths: list[float]) -> str:
        parts = []
        if setting["modalities"] != names:
            parts.append("+".join(setting["modalities"]) + "_alone")
        if setting["strength"] != strengths[0]:
            parts.append(f"s{setting['strength']:g}")
        return "/" + "_".join(parts) if parts else ""

    def _judges(self, pl_module) -> Any:
        """``{"segmentation", "depth", "features"}`` judges, built once (``None`` where off)."""
        if self._loaded_judges is not None:
            return self._loaded_judges
        from mcm.evaluation.judges.local_models import build_judges
        from mcm.models.base_loading import builtin_base_name

        # shipped judges by the base's built-in name, also when it was loaded from its directory
        opts, source = dict(self.judges or {}), str(pl_module.base.source)
        classes = E.segmentation_classes([pl_module.trainable]) if opts.get("segmenter") else None  # label map check
        judges = build_judges(base_name=builtin_base_name(source), num_classes=classes, device=str(pl_module.device),
                              **opts)
        if all(judges[k] is None for k in JUDGE_TASKS):
            log.warning("AlignmentCallback: no judge is available for the base '%s' (judges ship only with shapes32): "
                        "logging only what needs no learned judge (sketch_f1, if the module has sketch). Give local "
                        "models with judges={'segmenter': DIR, 'label_map': FILE, 'depth_model': DIR}.", source)
        self._loaded_judges = judges
        return judges

    def _log_grid(self, pl_module, images: list[torch.Tensor], labels: list[str]) -> None:
        data, n = self._data, min(self.grid_samples, images[0].shape[0])
        size = tuple(images[0].shape[-2:])
        plugins = pl_module.plugins
        conds = [torch.nn.functional.interpolate(plugins[k].visualize(data[k][:n]).float().cpu(), size=size,
                                                 mode="nearest")
                 for k in pl_module.modality_names if k in data]
        rows = conds + [data["image"][:n]] + [x[:n] for x in images]
        row_labels = [k for k in pl_module.modality_names if k in data] + ["held-out image"] + labels
        log_image_grid(pl_module, torch.cat(rows), f"{self.prefix}/samples", f"step{pl_module.global_step:06d}",
                       nrow=n, row_labels=row_labels)
