"""Strength maps and schedules, region masks (docs/concepts.md#the-mcm).

``strength`` is a float, a spatial map ``S(x, y)`` (image space, resized to model space), a per-step
schedule ``S(t)`` (a list with one value per inference step, value ``i`` at step ``i``, noisiest first, whatever
the scheduler's timestep spacing or evaluations per step; or a callable of the noise fraction ``t / T`` in
[0, 1], 1 = pure noise), or a map and a schedule together: ``p_hat = p + S(x, y, t) (p gamma
+ beta)``.  A region mask ``R`` (one per adapter, soft, in [0, 1]) limits where an adapter acts in a
composition: ``p_c = p_u + sum_i w_i R_i (p_i - p_u)``.  Everything is validated here, once per call,
with errors that name the argument, what came and what is expected.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Schedule = Sequence[float] | Callable[[float], float]


@dataclass
class Strength:
    """A strength that varies in space and/or over the schedule.

    ``map``: ``(1 or B, 1, h, w)`` in model space; ``schedule``: a list (``values[i]`` at inference step ``i``,
    counted by :class:`mcm.diffusion.sampling.StepCounter`) or a callable of the noise fraction; ``scale``: a
    float factor.
    """

    scale: float = 1.0
    map: torch.Tensor | None = None
    schedule: Schedule | None = None

    def at(self, fraction: float, batch_size: int, step: int | None = None) -> float | torch.Tensor:
        """The strength at inference step ``step`` (noise fraction ``t / T``) for a batch of ``batch_size`` rows
        (2B under guidance)."""
        s = self.scale * self.schedule_value(fraction, step)
        if self.map is None:
            return s
        m = self.map
        if m.shape[0] != batch_size:
            m = m.repeat(batch_size // m.shape[0], 1, 1, 1)
        return m * s if s != 1.0 else m

    def schedule_value(self, fraction: float, step: int | None = None) -> float:
        if self.schedule is None:
            return 1.0
        if callable(self.schedule):
            return float(self.schedule(fraction))
        if step is None:  # a list is indexed by the step, never guessed from t (timestep spacings differ)
            raise ValueError("strength: a schedule list is read by inference step; this prediction was asked for "
                             "outside a sampling loop (no step index); use a callable of t / T instead")
        if not 0 <= step < len(self.schedule):
            raise ValueError(f"strength: a schedule list of {len(self.schedule)} values was asked for inference "
                             f"step {step}; expected one value per step of the sampling run")
        return float(self.schedule[step])


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).float()
    try:  # PIL images
        arr = np.asarray(x, dtype=np.float32)
    except Exception:
        raise ValueError(f"{name}: expected a float, a map (tensor / numpy / PIL), a schedule (list or callable) "
                         f"or (map, schedule), got {type(x).__name__}") from None
    return torch.from_numpy(arr / 255.0 if arr.max(initial=0) > 1 else arr)


def spatial_map(x: Any, name: str, batch_size: int, image_size: tuple[int, int], model_size: tuple[int, int],
                low: float | None = 0.0, high: float | None = None) -> torch.Tensor:
    """``(H, W)`` / ``(B, H, W)`` / ``(B, 1, H, W)`` at the output size -> ``(1 or B, 1, h, w)`` in model space."""
    m = _as_tensor(x, name)
    shape = tuple(m.shape)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    elif not (m.ndim == 4 and m.shape[1] == 1):
        raise ValueError(f"{name}: expected a map of shape (H, W), (B, H, W) or (B, 1, H, W), got {shape}")
    if tuple(m.shape[-2:]) != tuple(image_size):
        raise ValueError(f"{name}: expected a map of {image_size[0]}x{image_size[1]} (the output size), got {shape}")
    if m.shape[0] not in (1, batch_size):
        raise ValueError(f"{name}: expected 1 or {batch_size} maps (the batch), got {m.shape[0]} (shape {shape})")
    if not torch.isfinite(m).all():
        raise ValueError(f"{name}: expected finite values, got {int((~torch.isfinite(m)).sum())} NaN/Inf")
    lo, hi = float(m.min()), float(m.max())
    if (low is not None and lo < low) or (high is not None and hi > high):
        rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name}: expected values in {rng}, got values in [{lo:g}, {hi:g}]")
    if tuple(m.shape[-2:]) != tuple(model_size):
        m = F.interpolate(m, size=model_size, mode="bilinear", align_corners=False)
    return m


def _check_number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def _schedule(x: Any, name: str, num_inference_steps: int) -> Schedule:
    if callable(x):
        for f in (0.0, 0.5, 1.0):  # a quick probe: a clear error now, not at step 17
            v = x(f)
            _check_number(v, f"{name}({f})")
            if float(v) < 0:
                raise ValueError(f"{name}: a schedule must be >= 0, got {name}({f}) = {v}")
        return x
    values = [_check_number(v, f"{name}[{i}]") for i, v in enumerate(x)]
    if len(values) != num_inference_steps:
        raise ValueError(f"{name}: a schedule list needs one value per inference step ({num_inference_steps}), "
                         f"got {len(values)}")
    if min(values) < 0:
        raise ValueError(f"{name}: a schedule must be >= 0, got {min(values)}")
    return values


def parse_strength(x: Any, name: str, batch_size: int, image_size: tuple[int, int], model_size: tuple[int, int],
                   num_inference_steps: int) -> float | Strength | None:
    """A user's strength -> ``None`` (the adapter's default), a float, or a :class:`Strength`.

    Floats may be negative (moving away from the control); maps and schedules must be >= 0.
    """
    if x is None:
        return None
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return _check_number(x, name)
    if isinstance(x, Strength):
        return x
    if isinstance(x, tuple) and len(x) == 2:  # (map, schedule)
        return Strength(map=spatial_map(x[0], f"{name}[0] (map)", batch_size, image_size, model_size),
                        schedule=_schedule(x[1], f"{name}[1] (schedule)", num_inference_steps))
    if callable(x) or (isinstance(x, (list, tuple)) and all(isinstance(v, numbers.Real) for v in x)):
        return Strength(schedule=_schedule(x, name, num_inference_steps))
    if isinstance(x, torch.Tensor) and x.ndim == 0:
        return _check_number(float(x), name)
    return Strength(map=spatial_map(x, name, batch_size, image_size, model_size))


def strength_at(strength: float | Strength, fraction: float, batch_size: int,
                step: int | None = None) -> float | torch.Tensor:
    return strength.at(fraction, batch_size, step) if isinstance(strength, Strength) else strength
