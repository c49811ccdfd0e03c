"""Training: the adapters' LightningModules (one shared base), callbacks, checkpoints, export.

Imports from ``models``, ``diffusion`` and ``pipelines``; never from ``evaluation`` or ``cli``.
"""
from mcm.training.adapter_module import AdapterModule
from mcm.training.controlnet_module import ControlNetModule
from mcm.training.mcm_module import MCMModule
from mcm.training.t2i_adapter_module import T2IAdapterModule

__all__ = ["AdapterModule", "ControlNetModule", "MCMModule", "T2IAdapterModule"]
