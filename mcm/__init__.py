"""MCM: control frozen pretrained diffusion models with new spatial modalities.

Reference: Ham et al., "Modulating Pretrained Diffusion Models for Multimodal Image
Synthesis", SIGGRAPH 2023 (arXiv 2302.12764).

Subpackages, whose imports run one way (docs/architecture.md):
``models`` <- ``diffusion`` <- ``pipelines`` <- ``training`` / ``evaluation`` <- ``cli``.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MCMPipeline": "mcm.pipelines.pipeline",
    "MCMPipelineOutput": "mcm.pipelines.pipeline",
    "attach": "mcm.pipelines.attach_denoiser",
    "AdapterStack": "mcm.pipelines.adapter_stack",
    "MCMModule": "mcm.training.mcm_module",
    "ControlNetModule": "mcm.training.controlnet_module",
    "T2IAdapterModule": "mcm.training.t2i_adapter_module",
    "FrozenBase": "mcm.models.frozen_base",
    "MultimodalConditioningModule": "mcm.models.modulator",
}


def __getattr__(name: str):
    # lazy: `import mcm` stays cheap for the CLI's data commands, and inference never imports Lightning
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcm' has no attribute {name!r}")


__all__ = ["attach", "MCMPipeline", "MCMPipelineOutput", "MCMModule", "ControlNetModule", "T2IAdapterModule", "FrozenBase",
           "MultimodalConditioningModule", "AdapterStack", "__version__"]
