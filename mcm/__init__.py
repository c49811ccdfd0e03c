"""MCM: control frozen pretrained diffusion models with new spatial modalities.

Reference: Ham et al., "Modulating Pretrained Diffusion Models for Multimodal Image
Synthesis", SIGGRAPH 2023 (arXiv 2302.12764).
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: `import mcm` stays cheap for the CLI's data commands
    if name == "MCMPipeline":
        from .pipeline import MCMPipeline

        return MCMPipeline
    if name == "MCMModule":
        from .mcm_module import MCMModule

        return MCMModule
    if name == "FrozenBase":
        from .frozen_base import FrozenBase

        return FrozenBase
    raise AttributeError(f"module 'mcm' has no attribute {name!r}")


__all__ = ["MCMPipeline", "MCMModule", "FrozenBase", "__version__"]
