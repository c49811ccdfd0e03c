"""Checks on an exported adapter's safetensors before its weights are trusted."""
from __future__ import annotations

from pathlib import Path

from torch import nn

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def tensor_names(file: Path) -> set[str]:
    """The tensor names of a safetensors file (its header only); a truncated or corrupt file is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"'{file}': not a complete safetensors file ({e}); the export may be truncated or "
                         f"corrupt, export it again with `mcm export`") from e


def check_tensors(module: nn.Module, file: Path, on_disk: set[str]) -> None:
    """The export's safetensors hold exactly the module's tensors (diffusers fills missing ones with random
    initial values and drops extra ones with a warning only)."""
    expected = set(module.state_dict())
    missing, extra = sorted(expected - on_disk), sorted(on_disk - expected)
    if missing or extra:
        raise ValueError(f"'{file}': expected the {len(expected)} tensors of the {type(module).__name__} its "
                         f"config.json describes, got {len(missing)} missing {missing[:5]} and {len(extra)} "
                         f"unexpected {extra[:5]}; the weights do not belong to this config")
