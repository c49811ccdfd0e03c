"""Exported adapters on disk: ``config.json`` + safetensors + ``mcm_base.json`` (base source and hash).

``load_module`` reads the export of any registered adapter kind (``mcm.models.adapter_kinds``: MCM,
ControlNet, SD3 ControlNet, T2I-Adapter, or a package's own; safetensors only, never pickle) and refuses, clearly, to pair it with a base other than the one it was trained on.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from mcm.models.adapter import Adapter
from mcm.models.adapter_kinds import kind_of_export
from mcm.models.export_checks import WEIGHTS_FILE  # noqa: F401 - the name exports' weights have
from mcm.models.frozen_base import WEIGHTS_DIR, FrozenBase, check_base

BUILTIN_MODULES = {
    "shapes32": WEIGHTS_DIR / "shapes32" / "mcm_multimodal",
    # single-modality modules trained on disjoint halves of the data, to compose (docs/concepts.md#composition)
    "shapes32_compose_segmentation": WEIGHTS_DIR / "shapes32" / "compose_segmentation",
    "shapes32_compose_sketch": WEIGHTS_DIR / "shapes32" / "compose_sketch",
}
BASE_INFO_FILE = "mcm_base.json"


def save_module(module: Adapter, out: str | Path, base: FrozenBase | dict) -> Path:
    """Write an exported adapter and ``mcm_base.json`` (the base's source, hash and parameter counts)."""
    out = Path(out)
    module.save_pretrained(out, safe_serialization=True)
    info = dict(base) if isinstance(base, dict) else {"source": base.source, "hash": base.content_hash(),
                                                      "base_parameters": base.num_parameters()}
    info["mcm_parameters"] = module.num_trainable_parameters()
    (out / BASE_INFO_FILE).write_text(json.dumps(info, indent=2))
    return out


def resolve_module_path(path: str | Path) -> Path:
    """A built-in module name or an export directory -> its directory; anything else is refused with the
    built-in names (and the closest one)."""
    resolved = Path(BUILTIN_MODULES.get(str(path), path))
    if not resolved.is_dir():
        close = difflib.get_close_matches(str(path), list(BUILTIN_MODULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FileNotFoundError(f"module '{path}': expected a built-in module ({', '.join(BUILTIN_MODULES)}) or an "
                                f"exported module directory (config.json + safetensors, from `mcm export CKPT OUT`), "
                                f"but no such directory exists{hint}")
    return resolved


def load_module(path: str | Path, base: FrozenBase | None = None, force_base: bool = False
                ) -> tuple[Adapter, dict]:
    """Load an exported adapter (a built-in name or a directory) and check it matches ``base``."""
    path = resolve_module_path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' is not an exported MCM (expected config.json + safetensors; "
                                f"make one with `mcm export CKPT OUT`)")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path / 'config.json'}': not valid JSON ({e}); expected the config `mcm export` "
                         f"writes") from e
    module = kind_of_export(path).load_class().load_export(path)  # the registered kind whose export this is
    info = json.loads((path / BASE_INFO_FILE).read_text()) if (path / BASE_INFO_FILE).is_file() else {}
    if base is not None:
        check_base(info, base, force_base, f"the MCM at '{path}'")
    return module.eval(), info


def base_of(module_dir: str | Path) -> str:
    """The base an export was trained on, from its ``mcm_base.json``."""
    info_file = resolve_module_path(module_dir) / BASE_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file} is missing: pass base=... to say which base this MCM modulates")
    return json.loads(info_file.read_text())["source"]
