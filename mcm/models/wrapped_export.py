"""Export of an adapter that wraps one diffusers model (ControlNet, SD3 ControlNet, T2I-Adapter).

The directory is the wrapped model's own ``save_pretrained`` output (``config.json`` + safetensors,
loadable by diffusers alone) plus one JSON file of ours with what diffusers does not keep: the
modalities, the downsampling and the default strength.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar


class WrappedModelExport:
    """Mixin: ``save_pretrained`` / ``read_export`` / ``is_export_dir`` for an adapter holding one diffusers model.

    Subclasses set ``export_file`` (our JSON's name), ``wrapped_attribute`` (where the diffusers model is),
    ``wrapped_class`` (its class, for loading) and ``export_kind`` (for error messages), and keep a
    ``config`` dict; their ``from_pretrained`` builds the adapter from :meth:`read_export`'s result.
    """

    export_file: ClassVar[str]
    wrapped_attribute: ClassVar[str]
    wrapped_class: ClassVar[type]
    export_kind: ClassVar[str]

    def save_pretrained(self, out: str | Path, safe_serialization: bool = True) -> Path:
        out = Path(out)
        getattr(self, self.wrapped_attribute).save_pretrained(out, safe_serialization=safe_serialization)
        (out / self.export_file).write_text(json.dumps(self.config, indent=2))
        return out

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
