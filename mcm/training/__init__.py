"""Training: the adapters' LightningModules (one shared base), callbacks, checkpoints, export.

Imports from ``models``, ``diffusion`` and ``pipelines``; never from ``evaluation`` or ``cli``.
"""
_LAZY = {"AdapterModule": "mcm.training.adapter_module", "ControlNetModule": "mcm.training.controlnet_module",
         "MCMModule": "mcm.training.mcm_module", "T2IAdapterModule": "mcm.training.t2i_adapter_module"}


def __getattr__(name: str):
    # lazy: the encoding job (`mcm data encode`, mcm.training.encode) does not import Lightning
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcm.training' has no attribute {name!r}")


__all__ = ["AdapterModule", "ControlNetModule", "MCMModule", "T2IAdapterModule"]
