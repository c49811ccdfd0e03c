"""``--device auto``: every command that runs a model defaults to the GPU when there is one."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """``"auto"`` (or ``None``) -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; any other name as given,
    checked by torch (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    return str(device)
