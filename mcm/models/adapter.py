"""The one protocol every adapter of a frozen base implements (docs/architecture.md).

MCM, ControlNet and T2I-Adapter differ in *how* they control the base, not in how the
sampler and composition use them.  Each:

* ``encode_conditions(conditions, present, size, batch_size) -> state``: the raw maps of its
  modalities -> whatever it needs at every step, once per sampling run (t-independent);
* ``controlled_prediction(base, x_t, t, context, state, strength, base_prediction) -> p``: the
  controlled prediction in the base's ``prediction_type``.  ``base_prediction()`` returns the
  base's own prediction for ``(x_t, t, context)``, computed at most once per step and shared by
  all adapters of a composition: an adapter that modulates the output (MCM) calls it, one that
  injects residuals into the base (ControlNet, T2I-Adapter) runs the base itself instead.

``strength`` is a float (or a tensor broadcastable to ``p``); ``default_strength`` is the one
the adapter was exported with (``strength=None`` at sampling uses it).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from modalities import ModalityError

BasePrediction = Callable[[], torch.Tensor]


def repeat_batch(state, batch_size: int):
    """``state`` (a tensor, or a list of them) encoded for B images -> for the ``k B`` rows the base sees
    (2B with guidance)."""
    if isinstance(state, (list, tuple)):
        return [repeat_batch(s, batch_size) for s in state]
    if state.shape[0] == batch_size:
        return state
    if batch_size % state.shape[0]:
        raise ValueError(f"adapter state: encoded for {state.shape[0]} images, asked for a batch of {batch_size}")
    return state.repeat(batch_size // state.shape[0], *([1] * (state.ndim - 1)))


class Adapter(nn.Module):
    """Base class of the adapters: the protocol above plus what every adapter has.

    Subclasses set ``plugins`` (name -> modality plugin, sorted by name) and ``modality_names``.
    """

    plugins: Mapping[str, Any]
    modality_names: list[str]
    default_strength: float = 1.0
    #: True if ``controlled_prediction`` needs of the base only ``base_prediction()`` (it modulates ``p``), so
    #: training can read ``p`` from cached predictions (``mcm data encode --predictions K``) and never run the
    #: base; False for adapters that inject residuals into the base's forward (ControlNet, T2I-Adapter)
    uses_base_prediction_only: bool = False

    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        raise NotImplementedError

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                              state: torch.Tensor, strength: float | torch.Tensor,
                              base_prediction: BasePrediction) -> torch.Tensor:
        raise NotImplementedError

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def conditioning_image(adapter: Adapter, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                       image_size: tuple[int, int], batch_size: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """Raw maps -> the ``(B, sum(channels), H, W)`` conditioning image of ControlNet / T2I-Adapter.

    The concatenated ``plugin.to_channels`` maps in ``modality_names`` order at image size;
    absent modalities are zeros.  ``present``: ``(B, M)`` in {0, 1} for modality dropout, ``None``
    = present iff given.
    """
    unknown = sorted(set(conditions) - set(adapter.modality_names))
    if unknown:
        raise ModalityError(f"this {type(adapter).__name__} was trained on {adapter.modality_names}; it has no "
                            f"modality {unknown}")
    H, W = image_size
    maps = []
    for j, (name, plugin) in enumerate(adapter.plugins.items()):
        if name not in conditions:
            maps.append(torch.zeros(batch_size, plugin.channels, H, W, device=device, dtype=dtype))
            continue
        c = plugin.to_channels(plugin.resize(conditions[name], (H, W))).to(device=device, dtype=dtype)
        if present is not None:
            c = c * present[:, j, None, None, None].to(device=device, dtype=dtype)  # (B, 1, 1, 1)
        maps.append(c)
    return torch.cat(maps, dim=1)


def scale_tokens(tokens: torch.Tensor, strength: float | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A transformer ControlNet's ``(B, N, D)`` patch tokens (``grid`` patches, raster order) times the strength; a
    strength map is averaged over each patch (bilinear resize to the grid)."""
    if not isinstance(strength, torch.Tensor):
        return tokens * strength
    s = F.interpolate(strength.to(tokens), size=tuple(grid), mode="bilinear", align_corners=False)  # (B, 1, gh, gw)
    return tokens * s.flatten(2).transpose(1, 2)  # (B, N, 1)


def scale_residual(residual: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """A ControlNet / T2I-Adapter residual times the strength; a strength map ``(B, 1, h, w)`` is resized
    (bilinear) to the residual's level, so the baselines get the same spatial control as the MCM."""
    if not isinstance(strength, torch.Tensor):
        return residual * strength
    s = strength.to(device=residual.device, dtype=residual.dtype)
    if tuple(s.shape[-2:]) != tuple(residual.shape[-2:]):
        s = F.interpolate(s, size=tuple(residual.shape[-2:]), mode="bilinear", align_corners=False)
    return residual * s
