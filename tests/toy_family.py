"""A base family from outside ``mcm`` (what a third-party package writes), registered at run time by
``tests/test_registries.py``: a pixel UNet directory marked with ``toy_family.json``, whose default guidance
and size differ from the built-in ``sd`` family it derives from, so a test can tell which family loaded it."""
from __future__ import annotations

from pathlib import Path

from mcm.models.frozen_base import FrozenBase

MARKER = "toy_family.json"


class ToyBase(FrozenBase):
    family = "toy"

    @classmethod
    def claims_directory(cls, path: Path) -> bool:
        return (Path(path) / MARKER).is_file()

    @classmethod
    def claims_denoiser(cls, denoiser) -> bool:
        return bool(getattr(denoiser.config, "toy", False))

    @property
    def sample_size(self) -> tuple[int, int]:
        return (8, 8)  # half the UNet's: an image of this size says the toy family was used

    @property
    def default_guidance_scale(self) -> float:
        return 1.0
