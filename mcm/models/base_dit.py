"""The DiT family (Peebles & Xie 2023): a class-conditional latent transformer, ``DiTTransformer2DModel``.

The context is the class labels ``(B,)``; the unconditional branch is the null class (the
embedding table's last row, ``num_embeds_ada_norm``: 1000 for ImageNet DiT), as ``DiTPipeline``
uses it.  The transformer predicts epsilon and a learned variance; the variance half is split off
(``FrozenBase._predict``) so the MCM modulates the epsilon half.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mcm.models.base_loading import _load_component, load_denoiser, load_optional
from mcm.models.frozen_base import FrozenBase


class DiTBase(FrozenBase):
    family = "dit"
    no_controlnet_reason = "diffusers has no ControlNet for DiT"
    denoiser_class = "DiTTransformer2DModel"

    @classmethod
    def load_components(cls, path: Path) -> dict:
        return {"unet": load_denoiser(path, "transformer"),
                "scheduler": _load_component(path, "scheduler", "diffusers", None),
                "vae": load_optional(path, "vae", "diffusers")}

    @property
    def default_guidance_scale(self) -> float:
        return 4.0  # ``DiTPipeline``'s default

    @property
    def is_text_conditional(self) -> bool:
        return False

    @property
    def is_class_conditional(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int:
        return self.num_classes  # DiT's label embedding has num_classes + 1 rows, the last one for "no class"

    def _labels(self, class_labels, batch_size: int) -> torch.Tensor:
        if class_labels is None:
            return torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.device)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        bad = labels[(labels < 0) | (labels > self.null_class)]
        if bad.numel():
            raise ValueError(f"class_labels: expected integers in 0..{self.num_classes - 1} (or {self.null_class} "
                             f"for no class), got {bad.tolist()}")
        return labels

    @torch.no_grad()
    def encode_context(self, prompts=None, class_labels=None, batch_size: int = 1, image_size=None):
        if prompts is not None and any(prompts):
            raise ValueError(f"prompt: the DiT base '{self.source}' is class-conditional; pass class_labels, "
                             f"not prompts")
        return self._labels(class_labels, batch_size)

    @torch.no_grad()
    def uncond_context(self, batch_size: int, negative_prompt=None, image_size=None):
        return self._labels(None, batch_size)

    def drop_context(self, context, drop: torch.Tensor, image_size: tuple[int, int] | None = None):
        if context is None:
            return context
        return torch.where(drop.to(context.device), torch.full_like(context, self.null_class), context)

    def model_kwargs(self, context) -> dict:
        if context is None:
            raise ValueError(f"context: the DiT base '{self.source}' needs class labels")
        return {"class_labels": context}

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        return self.unet(x, timestep=t, **kwargs, **extra).sample
