"""The frozen base's predictions for K noise draws per sample, cached in shards (docs/concepts.md#data-and-shard-keys, issue #17).

The MCM modulates ``p = f(x_t, t, y)`` of a base that takes no gradient, so ``p`` does not depend on the
MCM: computed once per (sample, t, noise) by ``mcm data encode --predictions K``, it serves every later
update that draws the same (sample, t, noise), and training runs neither the VAE, the text encoder nor the
UNet.  (ControlNet / T2I-Adapter cannot do this: their residuals go through the base's forward.)

Per sample, ``prediction_members`` returns ``.npy`` members (``np.save``, never pickled):

- ``pred_t.npy`` ``(K,)`` timesteps as the training forward process draws them (int64 for variance-preserving
  bases; float32 for flow bases, whose ``t = 1000 sigma`` is not an integer) and ``noise_seed.npy`` ``(K,)``
  int64, both drawn from a generator seeded with ``crc32(key)`` (as ``evaluation_noise`` seeds validation), so
  re-encoding gives the same draws; ``base.json`` names the density ``t`` was drawn from
  (``timestep_density``), and a run training from the cache must draw from the same one;
- ``xt.npy``, ``target.npy``, ``pred.npy`` and, for a base with guidance, ``pred_uncond.npy``:
  ``(K, C, h, w)`` in ``dtype`` (float16 by default: with the shipped shapes32 MCM over 64 real samples x 8
  draws the loss from float16 arrays differs from the float32 one by 0.0008% (conditional branch) and 0.0007%
  (unconditional), ``python bench/cached_predictions.py --quick``; the bar was 1%; half the bytes).

``x_t`` is stored, not re-derived from the latent and the seed: ``torch.randn`` streams are not promised
to stay the same across torch versions and devices, and a re-derived ``x_t`` that differs from the one the
base saw would pair ``p`` with the wrong input, silently.  ``noise_seed`` stays for provenance and checks.
The stored ``x_t`` is rounded to ``dtype`` *before* the base sees it, so ``pred`` is exactly the base's
prediction for the ``xt`` a training step reads.
"""
from __future__ import annotations

import io
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from datamodules.cached_fields import INT_KEYS, PREDICTION_KEYS, decode_cached
from mcm.diffusion.forward_process import forward_process_for

#: members a sample gains with ``--predictions K`` (``pred_uncond`` only for bases with guidance)
PREDICTION_FIELDS, INT_FIELDS = PREDICTION_KEYS, INT_KEYS  # the member names the DataModule reads
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def npy_bytes(a: np.ndarray) -> bytes:
    """``np.save`` bytes of a plain array (``allow_pickle=False``: object arrays are refused, not pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def prediction_draws(key: str, k: int, forward_process) -> tuple[torch.Tensor, torch.Tensor]:
    """The K ``(t, noise seed)`` pairs of sample ``key``, ``(K,)`` each, a function of the key alone.

    ``t`` follows the forward process's training density (the cache stands in for the online draws), in its
    dtype (int64, or float32 for flow matching: never truncated); a training step later picks one of the K.
    """
    g = torch.Generator().manual_seed(zlib.crc32(str(key).encode("utf-8")))
    t = forward_process.sample_timesteps(k, "cpu", generator=g)
    t = t.float() if t.is_floating_point() else t.long()
    seeds = torch.randint(0, 2**62, (k,), generator=g, dtype=torch.int64)
    return t, seeds


def draw_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The float32 CPU noise of one draw, regenerated from its ``noise_seed``."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def _image_size(base, x0: torch.Tensor) -> tuple[int, int]:
    return x0.shape[-2] * base.downsample, x0.shape[-1] * base.downsample


@torch.no_grad()
def prediction_members(base, x0: torch.Tensor, context: Any, keys: Sequence[str], k: int,
                       forward_process=None, dtype: str = "float16") -> list[dict[str, bytes]]:
    """The cached-prediction members of a batch, one dict ``{"pred.npy": bytes, ...}`` per sample.

    Args:
        base: the frozen base (``FrozenBase`` or a family subclass).
        x0: ``(B, C, h, w)`` model-space latents (what ``latent.npy`` holds).
        context: ``base.encode_context(...)`` of the batch's captions / class labels, or ``None``
            (unconditional base, or the empty prompt).
        keys: the B sample keys; they seed each sample's draws.
        k: draws per sample (>= 1).
        forward_process: the training forward process; default ``forward_process_for(base.scheduler)``.
        dtype: ``"float16"`` or ``"float32"`` for ``xt`` / ``target`` / ``pred`` / ``pred_uncond``.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k: expected the number of draws per sample (an int >= 1), got {k!r}")
    if not (isinstance(x0, torch.Tensor) and x0.ndim == 4 and x0.is_floating_point()):
        raise ValueError(f"x0: expected float model-space latents (B, C, h, w), got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    B = x0.shape[0]
    keys = [str(key) for key in keys]
    if len(keys) != B:
        raise ValueError(f"keys: expected one key per latent ({B}), got {len(keys)}")
    torch_dtype = STORAGE_DTYPES[dtype]
    fp = forward_process if forward_process is not None else forward_process_for(base.scheduler)
    device = base.device
    x0 = x0.to(device=device, dtype=torch.float32)
    uncond = base.uncond_context(B, image_size=_image_size(base, x0))  # None: the base has no guidance

    draws = [prediction_draws(key, k, fp) for key in keys]
    t_all = torch.stack([t for t, _ in draws])  # (B, K)
    seeds = torch.stack([s for _, s in draws])  # (B, K)
    out: dict[str, list[torch.Tensor]] = {"xt": [], "target": [], "pred": [], "pred_uncond": []}
    for j in range(k):  # one base call per draw over the whole batch (the context is the batch's, unrepeated)
        t = t_all[:, j].to(device)
        noise = torch.stack([draw_noise(s, x0.shape[1:]) for s in seeds[:, j].tolist()]).to(device)  # (B, C, h, w)
        # round x_t to its storage dtype first: pred is then the base's prediction for exactly the stored xt
        x_t = fp.add_noise(x0, noise, t).to(torch_dtype).float()
        out["xt"].append(x_t)
        out["target"].append(fp.target(x0, noise, t))
        out["pred"].append(base.predict(x_t, t, context))
        if uncond is not None:
            out["pred_uncond"].append(base.predict(x_t, t, uncond))
    arrays = {name: torch.stack(v, 1).to(torch_dtype).cpu().numpy() for name, v in out.items() if v}  # (B, K, ...)
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} non-finite values in {dtype} (keys "
                             f"{keys[:3]}...); store float32 (dtype='float32') or check the base")
    return [{"pred_t.npy": npy_bytes(t_all[i].numpy()), "noise_seed.npy": npy_bytes(seeds[i].numpy()),
             **{f"{name}.npy": npy_bytes(a[i]) for name, a in arrays.items()}} for i in range(B)]


def decode_npy(data: bytes, what: str) -> np.ndarray:
    """A ``.npy`` member's array (never unpickled); ``what`` names it in the error."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{what}: not a plain .npy array ({type(e).__name__}: {e})") from None


def prediction_batch(samples: Sequence[Mapping[str, bytes]]) -> dict[str, torch.Tensor]:
    """Members of B samples -> the batch entries a training step reads: ``pred_t`` / ``noise_seed`` ``(B, K)``
    (int64, ``pred_t`` float32 for flow bases), the rest ``(B, K, C, h, w)`` float32, decoded by the DataModule's own reader
    (:func:`datamodules.cached_fields.decode_cached`), for tests and benches."""
    decoded = [decode_cached(s) for s in samples]
    return {name: torch.stack([d[name] for d in decoded]) for name in PREDICTION_FIELDS if name in decoded[0]}
