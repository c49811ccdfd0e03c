"""An adapter kind from outside ``mcm`` (what a third-party package writes), registered at run time by
``tests/test_registries.py``: it scales the base's prediction by ``1 + s w m``, ``m`` the mean of its map."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

import modalities as modality_registry
from mcm.models.adapter import Adapter, repeat_batch
from mcm.models.adapter_kinds import AdapterKind

MARKER = "toy_adapter.json"


class ToyAdapter(Adapter, ModelMixin, ConfigMixin):
    uses_base_prediction_only = True

    @register_to_config
    def __init__(self, default_strength: float = 1.0):
        super().__init__()
        self.plugins = modality_registry.build_all({"depth": {}})
        self.modality_names = list(self.plugins)
        self.default_strength = default_strength
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def encode_conditions(self, conditions, present, size, batch_size):
        return conditions["depth"].float().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).to(self.w)

    def controlled_prediction(self, base, x_t, t, context, state, strength, base_prediction):
        return base_prediction() * (1 + strength * self.w * repeat_batch(state, x_t.shape[0]))

    def save_pretrained(self, out, **kwargs):
        super().save_pretrained(out, **kwargs)
        (Path(out) / MARKER).write_text(json.dumps({"adapter": "toy"}))

    @classmethod
    def is_export_dir(cls, path: Path) -> bool:
        return (Path(path) / MARKER).is_file()

    @classmethod
    def load_export(cls, path: Path) -> "ToyAdapter":
        return cls.from_pretrained(path, use_safetensors=True)

    @classmethod
    def from_checkpoint_config(cls, cfg: dict) -> "ToyAdapter":
        return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


TOY_KIND = AdapterKind("toy", "Toy", "toy_adapter:ToyAdapter", "toy_config", "toy.", "toy_adapter:ToyModule")
