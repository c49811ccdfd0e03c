"""What the families whose context is a dict of prompt encodings share (SD3, FLUX.1, PixArt-Σ): prompts in,
the unconditional branch from the (negative) prompt, and the transformer called with keyword arguments."""
from __future__ import annotations

import torch

from mcm.models.frozen_base import FrozenBase


class PromptDictBase(FrozenBase):
    """A text-conditional family whose ``_encode(prompts)`` returns a dict (``prompt_embeds`` and the family's
    other entries); ``display_name`` names it in errors."""

    display_name = "this"

    @property
    def is_text_conditional(self) -> bool:
        return True

    @torch.no_grad()
    def encode_context(self, prompts=None, class_labels=None, batch_size: int = 1, image_size=None):
        if class_labels is not None:
            raise ValueError(f"class_labels: the {self.display_name} base '{self.source}' is not class-conditional; "
                             f"it takes prompts")
        return dict(self.encode_text(prompts if prompts is not None else [""] * batch_size))

    @torch.no_grad()
    def uncond_context(self, batch_size: int, negative_prompt=None, image_size=None):
        """The encoded negative prompt (``""``: the empty prompt, as the family's pipeline encodes it)."""
        neg = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch_size
        return dict(self.encode_text(neg))

    def check_context(self, context) -> dict:
        if context is None:
            raise ValueError(f"context: the {self.display_name} base '{self.source}' needs prompt embeddings "
                             f"(\"\" for none)")
        return context

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        return self.unet(hidden_states=x, timestep=t, **kwargs, **extra).sample
