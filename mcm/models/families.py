"""The registry of base families (timm's pattern): ``list_families``, ``get_family``, ``detect_family``.

A family is one file: a :class:`~mcm.models.frozen_base.FrozenBase` subclass with a ``family`` name that says
which directories (``claims_directory``) and which loaded denoisers (``claims_denoiser``) are its own.  The
built-ins (``sd``, ``sdxl``, ``dit``, ``sd3``) are registered in this project's ``pyproject.toml`` exactly as a
third-party package registers its own::

    [project.entry-points."mcm.families"]
    my_family = "my_pkg.my_base:MyBase"

``register_family(cls)`` registers one at run time (a script, a test).  Nothing else in ``mcm`` names the
families: loading a directory asks each registered family whether it is its own.
"""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "mcm.families"
_REGISTERED: dict[str, type] = {}  # run-time registrations, which take precedence over entry points


def register_family(cls: type) -> type:
    """Register a ``FrozenBase`` subclass under its ``family`` name (usable as a class decorator)."""
    _check(cls, f"register_family({getattr(cls, '__name__', cls)!r})")
    _REGISTERED[cls.family] = cls
    return cls


def unregister_family(name: str) -> None:
    """Remove a run-time registration (entry points stay)."""
    _REGISTERED.pop(name, None)


def _entry_points() -> dict[str, Any]:
    # read on every call (cheap) so families installed after import are found
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_families(filter: str = "") -> list[str]:  # noqa: A002 - timm's name for it
    """Names of the registered families, sorted, optionally containing ``filter``."""
    return sorted(n for n in {*_entry_points(), *_REGISTERED} if filter in n)


def _check(cls: Any, what: str) -> None:
    from mcm.models.frozen_base import FrozenBase  # the registry sits beside the class it registers

    if not (isinstance(cls, type) and issubclass(cls, FrozenBase)):
        raise TypeError(f"{what}: expected a subclass of mcm.models.frozen_base.FrozenBase, got {cls!r}")


def get_family(name: str) -> type:
    """The ``FrozenBase`` subclass registered as ``name``; an unknown name lists the registered ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    eps = _entry_points()
    if name not in eps:
        names = list_families()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"family: unknown base family {name!r}; registered: {names}.{hint} A package registers "
                         f"its own under the entry-point group '{ENTRY_POINT_GROUP}'")
    cls = eps[name].load()
    _check(cls, f"entry point '{name}' ({eps[name].value})")
    return cls


def _only_one(claims: list[str], what: str) -> str:
    """The one claiming family; where a family and one derived from it both claim, the derived one (it
    specialises its parent, e.g. a package's family for a UNet variant over the built-in ``sd``)."""
    classes = {n: get_family(n) for n in claims}
    claims = [n for n in claims if not any(o is not classes[n] and issubclass(o, classes[n]) for o in classes.values())]
    if len(claims) == 1:
        return claims[0]
    if not claims:
        raise ValueError(f"{what}: no registered base family claims it (registered: {list_families()}); expected a "
                         f"diffusers-layout base of one of them (unet/ or transformer/ with scheduler/ ...)")
    raise ValueError(f"{what}: claimed by several base families {claims}; a family's claims_* must be specific")


def detect_family(path: str | Path) -> str:
    """The family of a base directory: the one registered family that claims it."""
    path = Path(path)
    return _only_one([n for n in list_families() if get_family(n).claims_directory(path)], f"base '{path}'")


def family_of_denoiser(denoiser: Any) -> str:
    """The family of an already-loaded denoiser (a pipeline's ``unet`` / ``transformer``)."""
    return _only_one([n for n in list_families() if get_family(n).claims_denoiser(denoiser)],
                     f"denoiser {type(denoiser).__name__}")


def denoiser_config(path: Path) -> tuple[str, dict] | None:
    """``(subfolder, config)`` of a directory's denoiser (``unet/`` or ``transformer/``), or ``None``."""
    import json

    for sub in ("unet", "transformer"):
        cfg = path / sub / "config.json"
        if cfg.is_file():
            return sub, json.loads(cfg.read_text())
    return None
