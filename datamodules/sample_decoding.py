"""Turning one webdataset sample (bytes per key) into tensors, and counting the ones that fail.

Decoding uses PIL, plain text and, for the members of cached shards, ``np.load(allow_pickle=False)``
(:mod:`datamodules.cached_fields`); no key is ever unpickled (``.pyd``, ``.pth``, ``.pickle``
members are ignored because nothing asks for them).
"""
from __future__ import annotations

import io
import json
import logging
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from modalities import Modality, ModalityError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
CAPTION_KEYS = ("txt", "caption")


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the shard, the key and why."""


class ShardDecodeError(BadSampleError):
    """A field of a shard sample that cannot be decoded or fails its modality's validation.

    The message names the shard, the sample key, the field (the member suffix, e.g. ``'seg.png'``)
    and what was expected; the exception that the decoder raised is kept as ``__cause__``
    (``raise ShardDecodeError(...) from e``).  Only this class (and :class:`BadSampleError`) counts
    as bad data: any other exception from a decoder or plugin is a bug and stops the run.
    """

    def __init__(self, message: str = "", *, shard: str | None = None, key: str | None = None,
                 field: str | None = None, expected: str | None = None):
        super().__init__(message)
        self.shard, self.key, self.field, self.expected = shard, key, field, expected

    @classmethod
    def of(cls, shard: str, key: str, field: str, expected: str, reason: str) -> "ShardDecodeError":
        msg = f"shard {shard}, sample '{key}', field {field}: {reason}"
        if expected and expected not in reason:
            msg += f"; expected {expected}"
        return cls(msg, shard=shard, key=key, field=field, expected=expected)

    def __reduce__(self):  # keyword-only fields survive pickling (DataLoader workers)
        return (_rebuild_decode_error, (str(self), self.shard, self.key, self.field, self.expected))


def _rebuild_decode_error(message, shard, key, field, expected) -> ShardDecodeError:
    return ShardDecodeError(message, shard=shard, key=key, field=field, expected=expected)


#: what a bad sample raises while it is decoded; anything else raised there is a bug in the code
DATA_ERRORS: tuple[type[BaseException], ...] = (BadSampleError, ModalityError)

IMAGE_EXPECTED = "an RGB or greyscale image (png, jpg, jpeg or webp) that PIL can read"


def image_field(sample: Mapping[str, Any]) -> str:
    """The member the image is read from (``'png'``, ``'jpg'`` ...), for error messages."""
    return next((f"'{k}'" for k in IMAGE_KEYS if k in sample), f"image (none of {list(IMAGE_KEYS)})")


def modality_field(plugin: Modality, sample: Mapping[str, Any]) -> str:
    """The member a modality is read (or derived) from, for error messages."""
    keys = list(plugin.shard_keys) + list(plugin.derive_keys)
    present = next((k for k in keys if k in sample), None)
    where = f"'{present}'" if present else (f"'{keys[0]}' (absent)" if keys else "(derived from the image)")
    return f"{where} of modality '{plugin.name}'"


class SkipCounter:
    """Webdataset ``handler=``: logs each bad sample with its shard and key, counts it, continues.

    Lives inside each data worker; the count travels to the main process with every batch
    (``batch["skipped"]``) so nothing is dropped silently.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: BaseException) -> bool:
        """Count and log ``exn``; used as webdataset's ``handler=`` for opening and grouping shards."""
        self.count += 1
        log.warning("skipping bad sample (%d so far): %s", self.count, exn)
        return True

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def decode_image(sample: Mapping[str, Any]) -> torch.Tensor:
    """The RGB image as a ``(3, H, W)`` uint8 tensor."""
    for k in IMAGE_KEYS:
        if k in sample:
            try:
                with Image.open(io.BytesIO(sample[k])) as im:
                    arr = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise BadSampleError(f"'{k}' is not a readable image ({type(e).__name__}: {e})") from None
            return torch.from_numpy(arr.copy()).permute(2, 0, 1)
    raise BadSampleError(f"no image key (one of {IMAGE_KEYS}); keys present: {sorted(k for k in sample if not k.startswith('__'))}")


def decode_caption(sample: Mapping[str, Any]) -> str:
    for k in CAPTION_KEYS:
        if k in sample:
            v = sample[k]
            return (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)).strip()
    return ""


CLASS_KEY = "cls"


def decode_class_label(sample: Mapping[str, Any]) -> int | None:
    """The integer class label of a sample (``cls``: integer text, else ``json["class_label"]``), for
    class-conditional bases; ``None`` when the sample has neither."""
    if CLASS_KEY in sample:
        v = sample[CLASS_KEY]
        text = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        try:
            return int(text.strip())
        except ValueError:
            raise BadSampleError(f"'cls' is {text.strip()[:40]!r}; expected an integer class label") from None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSampleError(f"'json' is not valid JSON ({e})") from None
        label = meta.get("class_label") if isinstance(meta, dict) else None
        if label is not None:
            if isinstance(label, bool) or not isinstance(label, int):
                raise BadSampleError(f"json 'class_label' is {label!r}; expected an integer class label")
            return label
    return None


def decode_modality(plugin: Modality, sample: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
    """The plugin's raw map from its shard key, or derived from the image / other keys."""
    raw = plugin.decode(sample)
    if raw is None:
        if plugin.derive_keys and not any(k in sample for k in plugin.derive_keys):
            raise BadSampleError(
                f"modality '{plugin.name}' needs one of the keys {list(plugin.shard_keys + plugin.derive_keys)}; "
                f"keys present: {sorted(k for k in sample if not k.startswith('__'))}")
        raw = plugin.derive_for_data(image.float() / 255.0, sample)
    h, w = image.shape[-2:]
    if tuple(raw.shape[-2:]) != (h, w):
        raise BadSampleError(f"modality '{plugin.name}' map is {tuple(raw.shape[-2:])} but the image is {(h, w)}")
    return raw


# torchvision resamples Masks with torch's legacy "nearest" (source pixel floor(i * in/out)), which
# shifts labels by up to half an output pixel against the bilinear image; NEAREST_EXACT samples the
# source pixel under each output pixel's centre, as bilinear does, so label edges stay on image edges.
_LABEL_RESAMPLING = v2.InterpolationMode.NEAREST_EXACT


class _AlignedResizedCrop(v2.RandomResizedCrop):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return TF.resize(TF.crop(inpt, **params), self.size, interpolation=_LABEL_RESAMPLING)
        return super().transform(inpt, params)


class _AlignedResize(v2.Resize):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return TF.resize(inpt, self.size, interpolation=_LABEL_RESAMPLING, max_size=self.max_size)
        return super().transform(inpt, params)


def joint_transform(image_size: int, crop_scale: tuple[float, float] | None) -> v2.Transform:
    """One geometric transform for the image and every spatial map (label maps resample nearest).

    ``crop_scale``: a random resized crop of that area range (training); ``None`` (evaluation, training with
    ``crop_scale=[1, 1]``, cached latents): resize the shorter side to ``image_size`` and take the centre, the
    presentation ``mcm data encode`` encodes.  The horizontal flip is separate (:func:`hflip_all`), decided
    by its own draw so the raw and the cached path flip the same samples.
    """
    if crop_scale is not None:
        return _AlignedResizedCrop(image_size, scale=crop_scale, ratio=(3 / 4, 4 / 3), antialias=True)
    return v2.Compose([_AlignedResize(image_size, antialias=True), v2.CenterCrop(image_size)])


def hflip_all(images_and_maps: Any) -> Any:
    """Mirror the image and every map together (a tuple, as a joint transform returns them, or one tensor)."""
    if isinstance(images_and_maps, tuple):
        return tuple(TF.horizontal_flip(t) for t in images_and_maps)
    return TF.horizontal_flip(images_and_maps)


def wrap_for_transform(plugin: Modality, raw: torch.Tensor) -> tv_tensors.TVTensor:
    # Mask -> nearest resampling; continuous maps (and soft class probabilities) ride as Image -> bilinear
    if plugin.is_label_map and not raw.is_floating_point():
        return tv_tensors.Mask(raw[None])
    return tv_tensors.Image(raw)


def unwrap(plugin: Modality, t: torch.Tensor) -> torch.Tensor:
    hard = plugin.is_label_map and isinstance(t, tv_tensors.Mask)
    t = t.as_subclass(torch.Tensor)
    return t[0].long() if hard else t.float()
