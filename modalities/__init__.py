"""Modality plugins: a registry over the ``mcm.modalities`` entry-point group.

Built-ins (``segmentation``, ``sketch``, ``depth``, ``partial_mask``) are registered in this
project's ``pyproject.toml`` exactly as a third-party package would register its own::

    [project.entry-points."mcm.modalities"]
    thermal = "my_pkg.thermal:Thermal"

``get(name, **options)`` / ``create`` build a plugin, ``list_modalities()`` names what is installed.
"""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any

from .base import ConvEncoder, Modality, ModalityError

ENTRY_POINT_GROUP = "mcm.modalities"

__all__ = ["Modality", "ModalityError", "ConvEncoder", "get", "create", "get_class", "list_modalities"]


def _entry_points() -> dict[str, Any]:
    # read on every call (cheap) so plugins installed after import are found
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_modalities(filter: str = "") -> list[str]:  # noqa: A002 - timm's name for it
    """Names of installed modalities, sorted, optionally containing ``filter``."""
    return sorted(n for n in _entry_points() if filter in n)


def get_class(name: str) -> type[Modality]:
    """The plugin class registered under ``name``; unknown names list what is installed."""
    eps = _entry_points()
    if name not in eps:
        close = difflib.get_close_matches(name, list(eps), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ModalityError(
            f"unknown modality '{name}'. Installed modalities: {sorted(eps) or 'none'}.{hint} "
            f"Plugins register a class under the entry-point group '{ENTRY_POINT_GROUP}'."
        )
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Modality)):
        raise ModalityError(f"entry point '{name}' ({eps[name].value}) is not a subclass of modalities.Modality")
    return cls


def get(name: str, **options: Any) -> Modality:
    """Build the plugin ``name`` with ``options``; ``None`` options are dropped (timm habit)."""
    return get_class(name)(**{k: v for k, v in options.items() if v is not None})


create = get


def build_all(spec: dict[str, dict[str, Any] | None] | list[str] | None) -> dict[str, Modality]:
    """``{"segmentation": {"num_classes": 6}, "sketch": {}}`` (or a list of names) -> plugins, in order."""
    if spec is None:
        return {}
    if isinstance(spec, (list, tuple)):
        spec = {n: {} for n in spec}
    return {name: get(name, **(opts or {})) for name, opts in spec.items()}
