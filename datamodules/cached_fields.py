"""The members ``mcm data encode`` adds to a shard, and turning them back into batch entries.

Member names (docs/concepts.md#data-and-shard-keys), each one ``np.save``'d array per sample (never pickled):

- ``latent.npy`` ``(C, h, w)``: model-space ``x0`` of the image as the DataModule presents it without
  random augmentation (resize + centre crop); ``latent_flip.npy``: the same of the mirrored image.
- text embeddings, what ``base.encode_context(caption)`` gives per image: SD 1.x/2.x ``text_emb.npy``
  ``(L, D)``; for the dict contexts each entry its own member, named after its key except
  ``prompt_embeds``, which is ``text_emb.npy`` in every family:

  ======== ============================================ ===================================
  family   members                                      ``batch["text_emb"]``
  ======== ============================================ ===================================
  sd       ``text_emb.npy``                             tensor ``(B, L, D)``
  sdxl     ``text_emb.npy text_embeds.npy time_ids.npy`` ``{"prompt_embeds", "text_embeds", "time_ids"}``
  sd3      ``text_emb.npy pooled.npy``                  ``{"prompt_embeds", "pooled"}``
  pixart   ``text_emb.npy prompt_attention_mask.npy``   ``{"prompt_embeds", "prompt_attention_mask"}``
  qwen     ``text_emb.npy prompt_embeds_mask.npy``      ``{"prompt_embeds", "prompt_embeds_mask"}`` (padded)
  dit      none (the ``cls`` member is the context)
  ======== ============================================ ===================================

- ``base_hash.txt``: the base's ``content_hash()``, so that shards read from a URL or ``pipe:`` (where no
  ``base.json`` can be found next to them) are checked against the training base too, batch by batch.
- with ``--predictions K`` (``mcm.training.prediction_cache``): ``pred_t.npy`` and ``noise_seed.npy``
  (int64), ``xt.npy``, ``target.npy``, ``pred.npy``, ``pred_uncond.npy``, each ``(K, ...)``.

Stored fp16 where the round trip is negligible (latents and embeddings: relative error <= 2^-11,
measured in ``tests/test_encode.py``), fp32 otherwise (``time_ids``: pixel sizes, which fp16 holds
exactly only up to 2048; any array fp16 would overflow).  Read back as float32 (int64 for
``noise_seed`` and for the integer ``pred_t`` of variance-preserving bases).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .sample_decoding import BadSampleError

log = logging.getLogger(__name__)

LATENT_KEYS = ("latent", "latent_flip")
TEXT_KEY = "text_emb"  # the tensor context, or the dict context's "prompt_embeds"
#: dict-context entries other than prompt_embeds, each stored under its own key
CONTEXT_EXTRA_KEYS = ("text_embeds", "time_ids", "pooled", "prompt_attention_mask", "prompt_embeds_mask")
#: the mask of a family whose prompts keep their own lengths (Qwen-Image pads a batch to its longest prompt): the
#: samples of a training batch, encoded in different batches, are padded to the longest of them when collated
RAGGED_MASK_KEY = "prompt_embeds_mask"
PREDICTION_KEYS = ("pred_t", "noise_seed", "xt", "target", "pred", "pred_uncond")
#: integer arrays (pred_t: except for a flow base, float32 t = 1000 sigma); a T5 attention mask is 0 / 1
INT_KEYS = ("pred_t", "noise_seed", "prompt_attention_mask", "prompt_embeds_mask")
FLOAT_OR_INT_KEYS = ("pred_t",)
#: numpy dtype kinds -> how an error names them
_KINDS = {"iu": "an integer", "f": "a float", "iuf": "an integer or float"}
CACHED_KEYS = LATENT_KEYS + (TEXT_KEY,) + CONTEXT_EXTRA_KEYS + PREDICTION_KEYS
#: stored fp32: fp16 is exact for integers only up to 2048 (SDXL's time_ids are pixel sizes)
FP32_KEYS = ("time_ids",)
BASE_JSON = "base.json"
#: per-sample copy of base.json's hash (member ``base_hash.txt``), for shards whose folder cannot be read
BASE_HASH_KEY, BASE_HASH_MEMBER = "base_hash", "base_hash.txt"
FP16_MAX = float(np.finfo(np.float16).max)


def member(key: str) -> str:
    """The shard member suffix of a cached key (``latent`` -> ``latent.npy``)."""
    return f"{key}.npy"


def array_bytes(key: str, x: torch.Tensor | np.ndarray) -> bytes:
    """One sample's array as ``.npy`` bytes: fp16 unless ``key`` needs fp32 or the values do not fit."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype.kind == "f":
        fits = key not in FP32_KEYS and (arr.size == 0 or float(np.abs(arr).max()) < FP16_MAX)
        arr = arr.astype(np.float16 if fits else np.float32)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def context_members(context: Any) -> dict[str, Any]:
    """``encode_context``'s output (batched) -> ``{cached key: batched tensor}`` (empty for ``None`` / labels)."""
    if context is None:
        return {}
    if isinstance(context, Mapping):
        unknown = sorted(set(context) - {"prompt_embeds", *CONTEXT_EXTRA_KEYS})
        if unknown:  # a new family: give its entries names here and in the reader
            raise ValueError(f"context entries {unknown}: no cached member name for them; known: "
                             f"prompt_embeds, {', '.join(CONTEXT_EXTRA_KEYS)}")
        return {(TEXT_KEY if k == "prompt_embeds" else k): v for k, v in context.items()}
    if context.is_floating_point():
        return {TEXT_KEY: context}
    return {}  # class labels (DiT): the sample's own ``cls`` member is the context


def _load(sample: Mapping[str, Any], key: str) -> torch.Tensor:
    name = member(key)
    try:
        arr = np.load(io.BytesIO(sample[name]), allow_pickle=False)
    except Exception as e:  # ValueError (object arrays, bad header), OSError / EOFError (junk)
        raise BadSampleError(f"'{name}' is not a plain .npy array ({type(e).__name__}: {e})") from None
    kinds = "iuf" if key in FLOAT_OR_INT_KEYS else "iu" if key in INT_KEYS else "f"
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in kinds:
        raise BadSampleError(f"'{name}' holds {getattr(arr, 'dtype', type(arr))}; expected {_KINDS[kinds]} array "
                             f"(from mcm data encode)")
    want_int = arr.dtype.kind in "iu"
    if not want_int and not np.isfinite(arr).all():
        raise BadSampleError(f"'{name}' has {int((~np.isfinite(arr)).sum())} NaN/Inf values; expected finite")
    return torch.from_numpy(arr.astype(np.int64 if want_int else np.float32))


def decode_cached(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The cached members of a sample as tensors: ``latent``, ``latent_flip``, ``text_emb`` (a tensor, or the
    dict ``encode_context`` gives for SDXL / SD3) and the prediction arrays; ``{}`` for a raw sample."""
    out: dict[str, Any] = {}
    for key in LATENT_KEYS + PREDICTION_KEYS:
        if member(key) in sample:
            out[key] = _load(sample, key)
    extra = {k: _load(sample, k) for k in CONTEXT_EXTRA_KEYS if member(k) in sample}
    if member(TEXT_KEY) in sample:
        emb = _load(sample, TEXT_KEY)
        out[TEXT_KEY] = {"prompt_embeds": emb, **extra} if extra else emb
    elif extra:
        raise BadSampleError(f"cached {sorted(member(k) for k in extra)} without '{member(TEXT_KEY)}'; expected "
                             f"all text-embedding members of the sample (re-encode the shard)")
    if BASE_HASH_MEMBER in sample:
        h = sample[BASE_HASH_MEMBER]
        out[BASE_HASH_KEY] = (h.decode("ascii", "replace") if isinstance(h, bytes) else str(h)).strip()
    if "latent_flip" in out and "latent" in out and out["latent_flip"].shape != out["latent"].shape:
        raise BadSampleError(f"'latent_flip.npy' is {tuple(out['latent_flip'].shape)} but 'latent.npy' is "
                             f"{tuple(out['latent'].shape)}; expected the same shape")
    return out


def pad_ragged_text(items: list[dict[str, Any]]) -> None:
    """Pad (in place) the cached ``prompt_embeds`` / ``prompt_embeds_mask`` of the samples of one batch to their
    longest (zero embeddings, mask 0: padding takes no part in the denoiser's attention), so they stack."""
    texts = [it.get(TEXT_KEY) for it in items]
    if not all(isinstance(t, dict) and RAGGED_MASK_KEY in t for t in texts):
        return
    n = max(t["prompt_embeds"].shape[0] for t in texts)
    for t in texts:
        pad = n - t["prompt_embeds"].shape[0]
        if pad:
            t["prompt_embeds"] = torch.nn.functional.pad(t["prompt_embeds"], (0, 0, 0, pad))
            t[RAGGED_MASK_KEY] = torch.nn.functional.pad(t[RAGGED_MASK_KEY], (0, pad))


def has_predictions(cached: Mapping[str, Any]) -> bool:
    return any(k in cached for k in PREDICTION_KEYS)


def pick_prediction_draw(cached: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
    """Keep one of a sample's K cached draws (a ``K = 1`` axis stays): drawn uniformly with ``generator``, or
    draw 0 when it is ``None`` (evaluation).  Done where the sample is decoded, so a batch carries one draw
    per sample instead of all K (at K = 64 and batch 32 on shapes32, 100 MB per batch otherwise)."""
    present = [k for k in PREDICTION_KEYS if k in cached]
    counts = {k: int(cached[k].shape[0]) if cached[k].ndim else 0 for k in present}
    k_draws = counts[present[0]]
    if k_draws < 1 or any(n != k_draws for n in counts.values()):
        raise BadSampleError(f"cached prediction members hold {counts} draws; expected the same K >= 1 in each "
                             f"(re-encode the shard with mcm data encode --predictions K)")
    j = 0 if generator is None else int(torch.randint(0, k_draws, (1,), generator=generator))
    return {**cached, **{k: cached[k][j:j + 1] for k in present}}


def read_base_json(shard_dir: str | Path) -> dict | None:
    """``shard_dir/base.json`` (written by ``mcm data encode``) or ``None`` for raw shards."""
    path = Path(shard_dir) / BASE_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected the record mcm data encode writes") from None
    if not isinstance(info, dict) or not info.get("hash"):
        raise ValueError(f"{path}: expected a JSON object with the base's 'source' and 'hash' (mcm data encode)")
    return info
