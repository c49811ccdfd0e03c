"""Inference: ``MCMPipeline`` (a ``diffusers.DiffusionPipeline``), exported adapters on disk, sample grids.

Never imports Lightning (``tests/test_architecture.py`` checks it).
"""
from mcm.pipelines.adapter_stack import AdapterStack
from mcm.pipelines.attach_denoiser import attach
from mcm.pipelines.module_io import BASE_INFO_FILE, BUILTIN_MODULES, load_module, save_module
from mcm.pipelines.pipeline import MCMPipeline, MCMPipelineOutput

__all__ = ["attach", "AdapterStack", "BASE_INFO_FILE", "BUILTIN_MODULES", "MCMPipeline", "MCMPipelineOutput", "load_module",
           "save_module"]
