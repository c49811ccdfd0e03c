"""The registry of adapter kinds (timm's pattern): ``list_adapter_kinds``, ``get_adapter_kind``, and lookups by
adapter object, export directory and checkpoint.  Every place that used to keep its own list of the adapters
(export loading, checkpoint export, grid labels) asks this registry instead.

A kind is one adapter class and its registration: its name (the export's and the checkpoint's tag), display
name, the class (which says whether a directory is its export, ``is_export_dir``, and how to load it,
``load_export``, and to rebuild it from a checkpoint's config, ``from_checkpoint_config``), the checkpoint key and
state-dict prefix its LightningModule writes, and that LightningModule.  The built-ins register below; a package
registers its own with :func:`register_adapter_kind` (or under the entry-point group ``mcm.adapters``, an
``AdapterKind``), with no change to ``mcm``.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "mcm.adapters"


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter.

    Args:
        name: the tag in exports and checkpoint configs (``"mcm"``, ``"controlnet"``, ...).
        display_name: how grids and logs name it (``"MCM"``, ``"ControlNet"``).
        adapter_class: ``"pkg.module:Class"`` of the adapter (imported when first needed).
        checkpoint_key: the key of its config in a LightningModule checkpoint (``"mcm_config"``).
        state_prefix: the prefix of its weights in that checkpoint's ``state_dict`` (``"mcm."``).
        lightning_module: ``"pkg.module:Class"`` of the LightningModule that trains it.
    """

    name: str
    display_name: str
    adapter_class: str
    checkpoint_key: str
    state_prefix: str
    lightning_module: str

    def load_class(self) -> type:
        return _load(self.adapter_class)

    def matches_checkpoint_config(self, cfg: dict) -> bool:
        """Kinds that share a checkpoint key (ControlNet and SD3 ControlNet) tell theirs by the config's tag."""
        tag = cfg.get("adapter", {}).get("adapter") if isinstance(cfg.get("adapter"), dict) else None
        return tag is None or tag == self.name


_REGISTERED: dict[str, AdapterKind] = {}


def register_adapter_kind(kind: AdapterKind) -> AdapterKind:
    if not isinstance(kind, AdapterKind):
        raise TypeError(f"register_adapter_kind: expected an AdapterKind, got {kind!r}")
    _REGISTERED[kind.name] = kind
    return kind


def unregister_adapter_kind(name: str) -> None:
    _REGISTERED.pop(name, None)


def _all() -> dict[str, AdapterKind]:
    kinds = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        kind = ep.load()
        if isinstance(kind, AdapterKind):
            kinds[kind.name] = kind
    return {**kinds, **_REGISTERED}


def list_adapter_kinds(filter: str = "") -> list[str]:  # noqa: A002 - timm's name for it
    return sorted(n for n in _all() if filter in n)


def get_adapter_kind(name: str) -> AdapterKind:
    kinds = _all()
    if name not in kinds:
        close = difflib.get_close_matches(name, list(kinds), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"adapter kind {name!r} is unknown; registered: {sorted(kinds)}.{hint}")
    return kinds[name]


def kind_of(adapter: Any) -> AdapterKind | None:
    """The kind of an adapter object (its class or a subclass), or ``None`` for an unregistered one."""
    for kind in _all().values():
        if isinstance(adapter, kind.load_class()):
            return kind
    return None


def display_name(adapter: Any) -> str:
    kind = kind_of(adapter)
    return kind.display_name if kind is not None else type(adapter).__name__


def kind_of_export(path: str | Path) -> AdapterKind:
    """The kind whose export ``path`` is (its class's ``is_export_dir``); the registered kinds if none."""
    claims = [k for k in _all().values() if k.load_class().is_export_dir(Path(path))]
    if len(claims) != 1:
        found = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
        raise ValueError(f"'{path}': {'no' if not claims else 'several'} adapter kinds claim this export "
                         f"({[k.name for k in claims] or list_adapter_kinds()}); found {found}; expected an "
                         f"`mcm export` directory")
    return claims[0]


def kind_of_checkpoint(ckpt: dict) -> AdapterKind | None:
    """The kind an adapter LightningModule's checkpoint holds (its config key and tag), or ``None``."""
    for kind in _all().values():
        cfg = ckpt.get(kind.checkpoint_key)
        if isinstance(cfg, dict) and kind.matches_checkpoint_config(cfg):
            return kind
    return None


def checkpoint_keys() -> list[str]:
    return sorted({k.checkpoint_key for k in _all().values()})


for _kind in (
    AdapterKind("mcm", "MCM", "mcm.models.modulator:MultimodalConditioningModule", "mcm_config", "mcm.",
                "mcm.training.mcm_module:MCMModule"),
    AdapterKind("controlnet", "ControlNet", "mcm.models.controlnet:ControlNetAdapter", "controlnet_config",
                "adapter.", "mcm.training.controlnet_module:ControlNetModule"),
    AdapterKind("sd3_controlnet", "SD3 ControlNet", "mcm.models.sd3_controlnet:SD3ControlNetAdapter",
                "controlnet_config", "adapter.", "mcm.training.controlnet_module:ControlNetModule"),
    AdapterKind("flux_controlnet", "FLUX ControlNet", "mcm.models.flux_controlnet:FluxControlNetAdapter",
                "controlnet_config", "adapter.", "mcm.training.controlnet_module:ControlNetModule"),
    AdapterKind("qwenimage_controlnet", "Qwen-Image ControlNet",
                "mcm.models.qwenimage_controlnet:QwenImageControlNetAdapter", "controlnet_config", "adapter.",
                "mcm.training.controlnet_module:ControlNetModule"),
    AdapterKind("sana_controlnet", "Sana ControlNet", "mcm.models.sana_controlnet:SanaControlNetAdapter",
                "controlnet_config", "adapter.", "mcm.training.controlnet_module:ControlNetModule"),
    AdapterKind("zimage_controlnet", "Z-Image ControlNet", "mcm.models.zimage_controlnet:ZImageControlNetAdapter",
                "controlnet_config", "adapter.", "mcm.training.controlnet_module:ControlNetModule"),
    AdapterKind("t2i_adapter", "T2I-Adapter", "mcm.models.t2i_adapter:T2IAdapterControl", "t2i_adapter_config",
                "adapter.", "mcm.training.t2i_adapter_module:T2IAdapterModule"),
):
    register_adapter_kind(_kind)
