"""What the families whose context is a dict of prompt encodings share (SD3, FLUX.1, PixArt-Σ, Sana, Qwen-Image,
Z-Image): prompts in, the unconditional branch from the (negative) prompt, and the transformer called with keyword
arguments; :class:`RaggedPromptBase` for those whose prompts keep their own lengths (Qwen-Image, Z-Image)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mcm.models.base_loading import _load_component, load_denoiser, load_optional
from mcm.models.frozen_base import FrozenBase


class PromptDictBase(FrozenBase):
    """A text-conditional family whose ``_encode(prompts)`` returns a dict (``prompt_embeds`` and the family's
    other entries); ``display_name`` names it in errors."""

    display_name = "this"

    @classmethod
    def load_components(cls, path: Path) -> dict:
        """``transformer/``, ``scheduler/`` and, if present, ``vae/``, ``text_encoder/``, ``tokenizer/`` (the
        single-text-encoder families; FLUX.1 and SD3 add their second and third)."""
        return {"unet": load_denoiser(path, "transformer"),
                "scheduler": _load_component(path, "scheduler", "diffusers", None),
                "vae": load_optional(path, "vae", "diffusers"),
                "text_encoder": load_optional(path, "text_encoder", "transformers"),
                "tokenizer": load_optional(path, "tokenizer", "transformers")}

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
        return as_prompt_dict(context)

    def align_contexts(self, a, b):
        """A context read back from cached shards with no entry but ``prompt_embeds`` is that tensor alone (FLUX.2):
        both made dicts again, so that they mix with an encoded one."""
        return as_prompt_dict(a), as_prompt_dict(b)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, extra: dict) -> torch.Tensor:
        return self.unet(hidden_states=x, timestep=t, **kwargs, **extra).sample


def as_prompt_dict(context):
    """``{"prompt_embeds": context}`` for a bare tensor (cached shards store a context whose only entry is
    ``prompt_embeds`` as that tensor); a dict unchanged."""
    return {"prompt_embeds": context} if isinstance(context, torch.Tensor) else context


def pad_prompts(context: dict, length: int) -> dict:
    """A ragged-prompt context padded with zero embeddings and mask 0 to ``length`` tokens (Qwen-Image's pipeline
    pads a batch's prompts to its longest the same way; masked tokens take no part in the transformer)."""
    n = context["prompt_embeds"].shape[1]
    if n == length:
        return context
    return {"prompt_embeds": F.pad(context["prompt_embeds"], (0, 0, 0, length - n)),
            "prompt_embeds_mask": F.pad(context["prompt_embeds_mask"], (0, length - n))}


def common_length(*contexts: dict) -> list[dict]:
    """The contexts padded to the longest of them."""
    n = max(c["prompt_embeds"].shape[1] for c in contexts)
    return [pad_prompts(c, n) for c in contexts]


def stack_ragged(embeds: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-prompt embeddings ``(L_i, D)`` -> ``{"prompt_embeds": (B, L, D), "prompt_embeds_mask": (B, L)}``, each
    prompt's tokens first and zeros after (mask 0)."""
    n = max(e.shape[0] for e in embeds)
    return {"prompt_embeds": torch.stack([F.pad(e, (0, 0, 0, n - e.shape[0])) for e in embeds]),
            "prompt_embeds_mask": torch.stack([(torch.arange(n, device=device) < e.shape[0]).long() for e in embeds])}


class RaggedPromptBase(PromptDictBase):
    """A family whose prompts keep their own lengths: its context is ``{"prompt_embeds", "prompt_embeds_mask"}``
    padded to the longest prompt of a batch; two contexts are padded to a common length before they are batched
    (guidance's one call) or mixed row by row (caption dropout to the empty prompt)."""

    def align_contexts(self, a: dict, b: dict) -> tuple[dict, dict]:
        return tuple(common_length(*super().align_contexts(a, b)))
