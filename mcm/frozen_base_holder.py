"""What every adapter LightningModule (MCM, ControlNet) shares about holding a frozen base.

The base is kept outside the module tree (not a submodule), so its parameters are never in
``.parameters()``: never in the optimizer, DDP's reducer or a checkpoint.  It still has to
follow ``.to(device)``, and modality dropout is the same for every adapter.
"""
from __future__ import annotations

import torch

from .frozen_base import FrozenBase


class FrozenBaseHolder:
    """Mixin for a ``LightningModule`` (list it first in the bases) that owns ``self.base``."""

    modality_names: list[str]

    def _attach_base(self, base: str, base_dtype: str | None) -> FrozenBase:
        dtype = getattr(torch, base_dtype) if base_dtype else None
        object.__setattr__(self, "base", FrozenBase.from_pretrained(base, torch_dtype=dtype))
        return self.base

    def _speed_up(self, trainable: torch.nn.Module, channels_last: bool, compile: bool | str) -> None:
        """Optional ``channels_last`` layout and ``torch.compile`` for the frozen UNet and the adapter
        (``compile``: ``True`` for torch's default backend, or a backend name such as ``"aot_eager"``).

        ``nn.Module.compile()`` compiles in place, so parameter names, ``state_dict``, the base's
        content hash and exported files are exactly those of the uncompiled modules.
        """
        if channels_last:
            self.base.unet.to(memory_format=torch.channels_last)
            trainable.to(memory_format=torch.channels_last)
        if compile:
            kwargs = {"backend": compile} if isinstance(compile, str) else {}
            self.base.unet.compile(**kwargs)
            trainable.compile(**kwargs)

    def _apply(self, fn, recurse: bool = True):
        # the base is not a submodule (so never trained/checkpointed) but must follow .to(device)
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)
        if hasattr(self.base.scheduler, "alphas_cumprod"):
            self.base.scheduler.alphas_cumprod = self.base.scheduler.alphas_cumprod.to(self.base.device)
        return self

    def presence(self, batch_size: int, train: bool) -> torch.Tensor:
        """``(B, M)`` keep-mask: each modality dropped w.p. ``modality_dropout``, all w.p. ``drop_all_prob``."""
        M = len(self.modality_names)
        if not train:
            return torch.ones(batch_size, M, device=self.device)
        keep = (torch.rand(batch_size, M, device=self.device) >= self.hparams.modality_dropout).float()
        keep_any = (torch.rand(batch_size, 1, device=self.device) >= self.hparams.drop_all_prob).float()
        return keep * keep_any
