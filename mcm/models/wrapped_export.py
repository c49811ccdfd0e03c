"""What the adapters that wrap one diffusers model share (ControlNet, SD3 ControlNet, T2I-Adapter): their
modality plugins and their export.

The directory is the wrapped model's own ``save_pretrained`` output (``config.json`` + safetensors,
loadable by diffusers alone) plus one JSON file of ours with what diffusers does not keep: the
modalities, the downsampling and the default strength.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import modalities as modality_registry


class WrappedModelExport:
    """Mixin: ``save_pretrained`` / ``read_export`` / ``is_export_dir`` for an adapter holding one diffusers model.

    Subclasses set ``export_file`` (our JSON's name), ``wrapped_attribute`` (where the diffusers model is),
    ``wrapped_class`` (its class, for loading), ``export_kind`` (for error messages), ``adapter_key`` (the
    config's ``"adapter"``) and ``method_name`` (for error messages); their ``__init__`` calls
    :meth:`set_modalities` and their ``from_pretrained`` builds the adapter from :meth:`read_export`'s result.
    """

    export_file: ClassVar[str]
    wrapped_attribute: ClassVar[str]
    wrapped_class: ClassVar[type]
    export_kind: ClassVar[str]
    adapter_key: ClassVar[str]
    method_name: ClassVar[str]

    def set_modalities(self, modalities: dict[str, dict[str, Any]], downsample: int, default_strength: float) -> int:
        """Build the plugins and keep what the config records; returns the channels their maps give."""
        if not modalities:
            raise ValueError(f"modalities: {self.method_name} needs at least one, e.g. "
                             f"{{'segmentation': {{'num_classes': 6}}}}")
        # sorted: the channel layout of the conditioning image must not depend on the YAML's order
        self.plugins = modality_registry.build_all({n: modalities[n] for n in sorted(modalities)})
        self.modality_names = list(self.plugins)
        self.downsample = downsample
        self.default_strength = float(default_strength)
        return sum(p.channels for p in self.plugins.values())

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds the plugins around the saved diffusers model (the export's JSON file)."""
        return {"adapter": self.adapter_key, "modalities": {n: p.config() for n, p in self.plugins.items()},
                "downsample": self.downsample, "default_strength": self.default_strength}

    def save_pretrained(self, out: str | Path, safe_serialization: bool = True) -> Path:
        out = Path(out)
        getattr(self, self.wrapped_attribute).save_pretrained(out, safe_serialization=safe_serialization)
        (out / self.export_file).write_text(json.dumps(self.config, indent=2))
        return out

    #: the key of the wrapped model's config in a checkpoint's adapter config (``ControlNetModule``: "controlnet")
    checkpoint_model_key: ClassVar[str]

    @classmethod
    def from_parts(cls, model: Any, cfg: dict[str, Any]) -> Any:
        """The adapter around a wrapped diffusers ``model`` and our config (the export's JSON file)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Any:
        return cls.from_parts(*cls.read_export(path))

    @classmethod
    def load_export(cls, path: str | Path) -> Any:
        return cls.from_pretrained(path)

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any]) -> Any:
        """An untrained adapter of the config its LightningModule's checkpoint records (weights loaded after)."""
        model_cfg = {k: v for k, v in cfg[cls.checkpoint_model_key].items() if not k.startswith("_")}
        return cls.from_parts(cls.wrapped_class.from_config(model_cfg), cfg["adapter"])

    @classmethod
    def is_export_dir(cls, path: str | Path) -> bool:
        return (Path(path) / cls.export_file).is_file()

    @classmethod
    def read_export(cls, path: str | Path) -> tuple[Any, dict[str, Any]]:
        """The wrapped diffusers model (safetensors only) and our config from an export directory."""
        path = Path(path)
        if not cls.is_export_dir(path):
            raise FileNotFoundError(f"'{path}': no {cls.export_file}; not an exported {cls.export_kind}")
        return cls.wrapped_class.from_pretrained(path, use_safetensors=True), json.loads((path / cls.export_file).read_text())
