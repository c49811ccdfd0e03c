"""``mcm fit|validate|test|predict -c experiments/X.yaml``: LightningCLI in omegaconf mode.

Models and data modules are chosen by ``class_path`` in the YAML (``mcm.MCMModule``,
``mcm.training.base_pretraining.BasePretrainModule``, ``datamodules.ShardDataModule`` ...); the
resolved config is saved next to every run, and into the wandb run when wandb logs it.
Interpolations such as ``modalities: ${data.init_args.modalities}`` are resolved after the
command line is applied (jsonargparse's ``omegaconf+`` mode), so
``--data.init_args.modalities.segmentation.num_classes 6`` reaches the model too.

Two safety nets around LightningCLI:

* **Class allow-list.**  A ``class_path`` imports a module and calls a class with arguments
  from the config, so a config from elsewhere could run anything (``subprocess.Popen``).
  Before anything is parsed or imported, the YAML files and ``--...`` arguments are scanned
  and a class outside :data:`ALLOWED_CLASS_PREFIXES` is refused with a message naming it;
  jsonargparse's own import-path policy then enforces the same list for whatever the scan
  cannot see (nested files, interpolations).  Trusted packages are added with
  ``MCM_ALLOW_CLASS_PREFIXES=my_pkg,other_pkg.callbacks``; ``--allow-any-class`` lifts the check.
* **Atomic checkpoints** (:class:`mcm.training.checkpoint_io.AtomicCheckpointIO`), installed unless the
  config names another ``CheckpointIO`` in ``trainer.plugins``.

And for exact resume and a clean first contact:

* :class:`mcm.training.rng_state.RNGState` and :class:`mcm.training.stop_checkpoint.CheckpointOnStop`
  are added to the trainer's callbacks when the config does not list them (random states in every
  checkpoint; ``last.ckpt`` at the step a ``max_time`` stop ended on).
* **Missing shards** are reported before any class is instantiated (no run directory, no wandb run):
  one line naming the shards and the command that makes them.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO

from mcm.training.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger(__name__)

#: modules a config may import classes from (dot-terminated: "mcm." does not admit "mcmx")
ALLOWED_CLASS_PREFIXES = ("lightning.", "torch.", "diffusers.", "transformers.", "mcm.", "modalities.",
                          "datamodules.")
ALLOW_ENV = "MCM_ALLOW_CLASS_PREFIXES"
ALLOW_FLAG = "--allow-any-class"
#: config keys whose plain string value jsonargparse may resolve to a class (``model: pkg.Class``)
_CLASS_KEYS = {"class_path", "model", "data", "optimizer", "lr_scheduler", "callbacks", "logger", "plugins",
               "strategy", "profiler", "accelerator", "help"}
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ClassNotAllowedError(ValueError):
    """A config names a class outside the allow-list."""


def allowed_prefixes() -> tuple[str, ...]:
    """The built-in allow-list plus the comma-separated prefixes of ``$MCM_ALLOW_CLASS_PREFIXES``."""
    extra = []
    for p in os.environ.get(ALLOW_ENV, "").split(","):
        p = p.strip().rstrip(".")
        if not p:
            continue
        if not all(part.isidentifier() for part in p.split(".")):
            raise ClassNotAllowedError(f"{ALLOW_ENV}: expected comma-separated module prefixes such as "
                                       f"'my_pkg,other_pkg.callbacks', got entry {p!r}")
        extra.append(p + ".")
    return ALLOWED_CLASS_PREFIXES + tuple(extra)


def _is_dotted_path(s: str) -> bool:
    return "." in s and all(part.isidentifier() for part in s.split("."))


def _config_file(s: str, base_dir: Path | None) -> Path | None:
    if not s.endswith(_CONFIG_SUFFIXES):
        return None
    for p in (Path(s), (base_dir / s) if base_dir else None):
        if p is not None and p.is_file():
            return p
    return None


class _Scan:
    """Collects ``(class path, where)`` pairs from configs and arguments, following nested config files."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []
        self._files: set[Path] = set()

    def file(self, path: Path, where: str) -> None:
        path = path.resolve()
        if path in self._files:
            return
        self._files.add(path)
        try:
            node = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return  # unreadable or not YAML: LightningCLI reports it, and imports nothing from it
        self.node(node, str(path), class_key=False, base_dir=path.parent)

    def value(self, s: str, where: str, class_key: bool, base_dir: Path | None) -> None:
        cfg = _config_file(s, base_dir)
        if cfg is not None:
            self.file(cfg, where)
        elif s.lstrip().startswith(("{", "[")):  # inline YAML/JSON, e.g. --model '{"class_path": ...}'
            try:
                self.node(yaml.safe_load(s), where, class_key, base_dir)
            except yaml.YAMLError:
                pass
        elif class_key and _is_dotted_path(s):
            self.found.append((s, where))

    def node(self, node: Any, where: str, class_key: bool, base_dir: Path | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = str(k).rstrip("+")
                self.node(v, f"{where}:{key}" if ":" not in where else f"{where}.{key}", key in _CLASS_KEYS, base_dir)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.node(v, f"{where}[{i}]", class_key, base_dir)
        elif isinstance(node, str):
            self.value(node, where, class_key, base_dir)

    def argv(self, argv: list[str]) -> None:
        for i, tok in enumerate(argv):
            if not tok.startswith("-"):
                continue
            if "=" in tok:
                key, val = tok.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, val = tok, argv[i + 1]
            else:
                continue
            key = key.lstrip("-").rstrip("+")
            if key in ("c", "config"):
                self.file(Path(val), f"--config {val}")
            else:
                self.value(val, f"argument --{key}", key.split(".")[-1] in _CLASS_KEYS, None)


def check_config_classes(argv: list[str], prefixes: tuple[str, ...] | None = None) -> None:
    """Refuse (``ClassNotAllowedError``) any class path in the configs or arguments outside the allow-list.

    Nothing is imported: the YAML files are read with ``yaml.safe_load``.
    """
    prefixes = allowed_prefixes() if prefixes is None else prefixes
    scan = _Scan()
    scan.argv(list(argv))
    for path, where in scan.found:
        if not any((path + ".").startswith(p) for p in prefixes):
            top = path.split(".")[0]
            raise ClassNotAllowedError(
                f"class_path '{path}' ({where}) is not in the allow-list of importable packages "
                f"({', '.join(p.rstrip('.') for p in prefixes)}); importing it could run arbitrary code. If you trust "
                f"it, allow its package with {ALLOW_ENV}={top} (comma-separated prefixes) or pass {ALLOW_FLAG}")


@contextlib.contextmanager
def _import_policy(prefixes: tuple[str, ...] | None) -> Iterator[None]:
    """jsonargparse refuses to import any value-given path outside ``prefixes`` (restored afterwards)."""
    try:
        from jsonargparse import _common, set_parsing_settings

        keys = ("import_path_verdicts", "import_paths_enforced")
        saved = {k: _common.parsing_settings[k] for k in keys}
    except (ImportError, AttributeError, KeyError):  # a jsonargparse without import-path policies
        yield
        return
    try:
        if prefixes is not None:
            set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=[p.rstrip(".") for p in prefixes])
        yield
    finally:
        _common.parsing_settings.update(saved)


class SaveConfigToRun(SaveConfigCallback):
    """Also keeps the resolved config with the wandb run (Lightning calls this on rank zero only).

    ``<run>/files/lightning_config.yaml`` is per run (``<log_dir>/config.yaml`` is shared by runs
    with the same ``save_dir``), and the trainer settings join the model/data hyperparameters in
    the run's config.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                text = self.parser.dump(self.config, skip_none=False)
                Path(lg.experiment.dir, "lightning_config.yaml").write_text(text)
                cfg = yaml.safe_load(text)
                lg.log_hyperparams({k: cfg[k] for k in ("trainer", "seed_everything", "ckpt_path") if k in cfg})


#: which shard lists each subcommand reads (``test_shards`` falls back to ``val_shards``)
_SHARDS_NEEDED = {"fit": ("train_shards", "val_shards"), "validate": ("val_shards",),
                  "test": ("test_shards",), "predict": ("test_shards",)}


class MissingDataError(FileNotFoundError):
    """The shards a config names do not exist (reported before anything is instantiated)."""


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    if isinstance(ns, dict):
        return ns.get(key, default)
    return getattr(ns, key, default)


def _how_to_make(missing: list[str], data_args: Any) -> str:
    """The command that makes the missing shards: ``mcm data shapes`` for the shapes layout, else pack."""
    dirs = sorted({os.path.dirname(m) or "." for m in missing})
    names = [os.path.basename(m) for m in missing]
    if len(dirs) == 1 and "shapes" in os.path.basename(dirs[0]).lower() and all(
            n.startswith(("train-", "val-")) for n in names):
        n_train = _get(data_args, "limit_train_samples") or 2000
        size = _get(data_args, "image_size", 32)
        size_arg = f" --size {size}" if size and int(size) != 32 else ""
        return f"make them with `mcm data shapes --out {dirs[0]} --train {n_train} --val 200{size_arg}`"
    return ("make them with `mcm data pack` (see `mcm data pack --help`) or `mcm data shapes --out DIR --train N "
            "--val M`, or point the config at existing shards")


def check_shards(subcommand: str | None, data: Any) -> None:
    """Raise :class:`MissingDataError` naming the missing shards of ``data`` (a parsed ``data`` config) that
    ``subcommand`` would read, and the command that makes them.  Remote URLs are not checked."""
    from datamodules.shard_datamodule import expand_shards

    args = _get(data, "init_args", data)
    for key in _SHARDS_NEEDED.get(subcommand or "", ()):
        spec = _get(args, key)
        if key == "test_shards" and not spec:
            key, spec = "val_shards", _get(args, "val_shards")
        if not spec:
            continue
        try:
            expand_shards(spec, f"data.init_args.{key}")
        except FileNotFoundError as e:
            missing = [m for m in (spec if isinstance(spec, (list, tuple)) else [spec])]
            from webdataset.shardlists import expand_urls

            urls = [u for m in missing for u in expand_urls(str(m))]
            gone = [u for u in urls if not glob.glob(u.removeprefix("file:"))]
            raise MissingDataError(f"{e}; {_how_to_make(gone or urls, args)}") from None


def resolve_load_denoiser(model: Any, data: Any, subcommand: str | None = "fit") -> None:
    """``load_denoiser: null`` (the default) -> ``False`` for ``mcm fit`` when every training and validation shard
    folder holds cached predictions (``base.json`` with ``predictions`` > 0: no step runs the base, so its
    denoiser's weights are not read), else ``True`` (and always for validate / test / predict, which sample).
    One log line says when the weights are left out."""
    from datamodules.cached_fields import read_base_json
    from datamodules.shard_datamodule import expand_shards, is_remote, shard_folders

    init = _get(model, "init_args")
    if init is None or not hasattr(init, "load_denoiser") or _get(init, "load_denoiser") is not None:
        return
    if subcommand != "fit":
        init.load_denoiser = True
        return
    args = _get(data, "init_args", data)
    urls = [u for key in ("train_shards", "val_shards") if _get(args, key)
            for u in expand_shards(_get(args, key), f"data.init_args.{key}")]
    dirs = shard_folders(urls)  # a remote shard's folder, and so its base.json, cannot be read here
    base_free = bool(dirs) and not any(is_remote(u) for u in urls) and all(
        (read_base_json(d) or {}).get("predictions", 0) > 0 for d in dirs)
    init.load_denoiser = not base_free
    if base_free:
        log.info("mcm fit: every shard folder holds the base's cached predictions (%s): the denoiser's weights "
                 "are not loaded (model.init_args.load_denoiser=false; grids and alignment load them when they "
                 "sample)", ", ".join(dirs))


class MCMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        """``--judges.segmenter DIR --judges.label_map FILE --judges.depth_model DIR``: the alignment callback's
        local judges from the command line (a callback's options sit deep in a list the command line cannot
        index); applied by :meth:`instantiate_trainer`."""
        from mcm.cli.alignment_callback import JUDGE_OPTIONS

        for key in JUDGE_OPTIONS:
            parser.add_argument(f"--judges.{key}", type=Optional[str], default=None,
                                help=f"AlignmentCallback judges: {key} (sets it on the config's callback, or adds one)")

    def before_instantiate_classes(self) -> None:
        """Missing shards end here, in one line, before a run directory or wandb run exists."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        data = _get(config, "data")
        try:
            check_shards(self.subcommand, data)
        except MissingDataError as e:
            raise SystemExit(f"mcm: error: {e}") from None
        resolve_load_denoiser(_get(config, "model"), data, self.subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, with :class:`AtomicCheckpointIO` unless the config chose a ``CheckpointIO``,
        :class:`RNGState` / :class:`CheckpointOnStop` unless the config lists them, and ``precision: null``
        resolved (:func:`default_precision`: bf16 mixed precision on a GPU, 32-bit on the CPU)."""
        from mcm.training.rng_state import RNGState
        from mcm.training.stop_checkpoint import CheckpointOnStop

        config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = str(config.get("strategy", "")).lower()
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not any(
                s in strategy for s in ("fsdp", "deepspeed")):  # those write sharded checkpoints their own way
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        callbacks = kwargs.get("callbacks", config.get("callbacks"))
        if callbacks is None:
            callbacks = []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        for cls in (RNGState, CheckpointOnStop):
            if not any(isinstance(c, cls) for c in callbacks):
                callbacks.append(cls())
        if config.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks):
            # a user's own `trainer:` block replaces the experiment's whole trainer section, callbacks included:
            # without this, Lightning's default checkpoint keeps no last.ckpt and `--ckpt_path last` cannot resume
            callbacks.append(required_checkpoint(config))
        apply_judges(callbacks, self._get(self.config_init, "judges", default=None))
        kwargs["callbacks"] = callbacks
        if kwargs.get("precision", config.get("precision")) is None:
            kwargs["precision"] = default_precision(config.get("accelerator", "auto"), torch.cuda.is_available())
        return super().instantiate_trainer(**kwargs)


def apply_judges(callbacks: list, judges: Any) -> None:
    """Set the ``--judges.*`` given on the command line on every :class:`AlignmentCallback` of ``callbacks``
    (over the config's own judges), or add one with them when the callbacks (a user's own ``trainer:`` block)
    list none."""
    from mcm.cli.alignment_callback import AlignmentCallback

    given = {k: v for k, v in dict(vars(judges) if hasattr(judges, "__dict__") else judges or {}).items()
             if v is not None}
    if not given:
        return
    aligned = [c for c in callbacks if isinstance(c, AlignmentCallback)]
    for cb in aligned:
        cb.judges = {**(cb.judges or {}), **given}
        cb._loaded_judges = None
    if not aligned:
        log.info("mcm fit: --judges given and the trainer's callbacks name no AlignmentCallback; added one "
                 "with its defaults and these judges")
        callbacks.append(AlignmentCallback(judges=given))


def required_checkpoint(trainer_config: dict) -> ModelCheckpoint:
    """The checkpoint every ``mcm fit`` keeps when its config names none: ``last.ckpt`` (and the step's) in
    ``<default_root_dir>/checkpoints`` every ``val_check_interval`` steps (1000 if that is not a step count)."""
    root = trainer_config.get("default_root_dir") or "runs/mcm"
    every = trainer_config.get("val_check_interval")
    every = every if isinstance(every, int) and not isinstance(every, bool) and every > 0 else 1000
    log.info("mcm fit: the trainer's callbacks name no ModelCheckpoint; added one keeping last.ckpt in "
             "%s/checkpoints every %d steps (name your own to choose)", root, every)
    return ModelCheckpoint(dirpath=f"{root}/checkpoints", save_last=True, every_n_train_steps=every, save_top_k=0)


def default_precision(accelerator: Any, cuda_available: bool) -> str:
    """``precision: null`` in an experiment: ``bf16-mixed`` where the run uses a GPU (the trainable adapter's
    matmuls in bf16, its weights and optimizer in fp32, as diffusers' train scripts do), ``32-true`` on the CPU,
    where bf16 autocast is slower and the shapes32 figures were measured in fp32."""
    on_gpu = str(accelerator).lower() in ("gpu", "cuda") or (str(accelerator).lower() == "auto" and cuda_available)
    return "bf16-mixed" if on_gpu else "32-true"


def run_lightning_cli(argv: list[str]) -> MCMCLI:
    """Run LightningCLI on ``argv`` after the class allow-list check (``--allow-any-class`` lifts it)."""
    argv = list(argv)
    allow_any = ALLOW_FLAG in argv
    argv = [a for a in argv if a != ALLOW_FLAG]
    prefixes = None
    if not allow_any:
        try:
            prefixes = allowed_prefixes()
            check_config_classes(argv, prefixes)
        except ClassNotAllowedError as e:
            raise SystemExit(f"mcm: error: {e}") from None
    # omegaconf+ resolves interpolations on the final config (command line included); relative
    # paths keep the YAMLs' ``${data.init_args.modalities}`` (written for the subcommand's root) valid
    from jsonargparse import set_parsing_settings

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # `mcm fit ...` passes argv as args= while sys.argv holds the same words (Lightning's DDP launcher
    # re-runs sys.argv for the other ranks, so it stays): the "args and command line" warning is noise here
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # Lightning's own use of a torch API that torch >= 2.9 deprecates; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning logs through its own handlers; without this, `mcm`'s root handler printed every line twice
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        if logging.getLogger(name).handlers:
            logging.getLogger(name).propagate = False
    with _import_policy(prefixes):
        return MCMCLI(
            L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=argv, seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_callback=SaveConfigToRun, save_config_kwargs={"overwrite": True},
        )
