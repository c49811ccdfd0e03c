"""``AdapterStack``: the adapters of an ``MCMPipeline`` as one diffusers component.

``DiffusionPipeline.register_modules`` takes one object per component, as diffusers'
``MultiControlNetModel`` holds several ControlNets; this holds any mix of adapters (MCM,
ControlNet, T2I-Adapter) with their composition weights and the base each was trained on.
Saved as ``adapters/00``, ``adapters/01``, ... (each an ``mcm export`` directory) plus
``adapters/stack.json``; ``model_index.json`` names it ``["mcm.pipelines.adapter_stack", "AdapterStack"]``
(diffusers imports that module and finds ``ModelMixin`` in it to choose ``from_pretrained``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from diffusers import ModelMixin
from torch import nn

from mcm.models.adapter import Adapter
from mcm.pipelines.module_io import load_module, save_module

STACK_FILE = "stack.json"


class AdapterStack(ModelMixin):
    """Adapters, their composition weights ``w_i`` and their ``mcm_base.json`` infos."""

    def __init__(self, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                 infos: Sequence[dict] | None = None):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.adapters)
        self.infos = [dict(i) for i in infos] if infos is not None else [{} for _ in self.adapters]
        if len(self.weights) != len(self.adapters):
            raise ValueError(f"weights: got {len(self.weights)} weights for {len(self.adapters)} modules")

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self):
        return iter(self.adapters)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        for i, (a, info) in enumerate(zip(self.adapters, self.infos)):
            save_module(a, out / f"{i:02d}", info)
        (out / STACK_FILE).write_text(json.dumps({"weights": self.weights, "count": len(self.adapters)}, indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "AdapterStack":
        path = Path(pretrained_model_name_or_path) / (subfolder or "")
        spec_file = path / STACK_FILE
        if not spec_file.is_file():
            raise FileNotFoundError(f"'{path}': no {STACK_FILE}; not the adapters/ folder of a saved MCMPipeline")
        spec = json.loads(spec_file.read_text())
        loaded = [load_module(path / f"{i:02d}") for i in range(spec["count"])]
        stack = cls([m for m, _ in loaded], spec["weights"], [info for _, info in loaded])
        return stack.to(torch_dtype) if torch_dtype is not None else stack
