"""The modality plugin API (docs/plugins.md).

A modality says how a spatial control is read from a shard, derived from the RGB image
when the shard lacks it, augmented for training, checked, turned into channels, encoded
to MCM features and drawn.  Built-ins and third-party plugins are the same kind of class,
registered through the ``mcm.modalities`` entry-point group.

Formats used throughout (B = batch):

* raw map — what a batch carries under the modality's name and what users pass to the
  pipeline: label maps are ``(B, H, W)`` int64 (segmentation-like ones also take soft class
  probabilities ``(B, K, H, W)`` float, see ``accepts_probabilities``), continuous maps
  ``(B, C, H, W)`` float32; a single sample drops the leading ``B``.
* channels — ``to_channels(raw)``: ``(B, channels, H, W)`` float32, the encoder's input.
  An absent modality is all zeros in this format (plus presence 0 in the MCM input).
"""
from __future__ import annotations

import functools
import inspect
import io
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_image


class ModalityError(ValueError):
    """Bad input for a modality; the message names the modality, what was expected and what came."""


class ConvEncoder(nn.Module):
    """Small conv encoder: raw channels -> ``out_channels`` features, downsampled by ``downsample``.

    ``downsample`` is 1 for pixel bases and 8 for Stable Diffusion's latent space; each
    factor of 2 is one stride-2 conv so thin structures (sketch strokes) are not aliased away.
    """

    def __init__(self, in_channels: int, out_channels: int = 16, hidden: int = 32, downsample: int = 1):
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 1, got {downsample}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(int(np.log2(downsample))):
            layers += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(hidden, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/ds, W/ds)
        return self.net(x)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_channels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` integer labels -> ``(B, K, H, W)`` float one-hot, channels-last (``F.one_hot`` + permute's
    layout).  A scatter, not ``F.one_hot``: that one reads the labels' range back from the device on every call (a
    host synchronisation per training step on CUDA); the range is validated where maps enter (``validate``)."""
    B, H, W = labels.shape
    out = torch.zeros(B, H, W, num_classes, device=labels.device)
    return out.scatter_(-1, labels.long().unsqueeze(-1), 1.0).permute(0, 3, 1, 2)


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _recording(init):
    """``init`` that records its bound arguments (with defaults) as ``self._config``, once per object: the
    outermost ``__init__`` of a subclass chain records, a ``super().__init__`` call inside it does not."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        outer = "_config" not in vars(self)
        if outer:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._config = {}  # marks the outermost call while the chain runs
        init(self, *args, **kwargs)
        if outer:
            self._config = {k: _plain(v) for k, v in list(bound.arguments.items())[1:]
                            if signature.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                    inspect.Parameter.VAR_KEYWORD)}

    return wrapper


def png_bytes_to_array(data: bytes, what: str) -> np.ndarray:
    """Decode PNG/JPEG bytes to ``(H, W)`` or ``(H, W, C)`` (never pickle); 16-bit PNGs stay uint16.

    torchvision decodes, so the dtype says the bit depth: a 16-bit map is uint16 whatever its values.
    PNGs under 8 bits go through PIL: torchvision leaves small palettes' indices packed and scales
    1-bit greyscale to 0/255, where label maps need the raw indices (PIL gives them, and 1-bit as bool).
    """
    # IHDR: signature (8), length (4), b"IHDR" (4), width (4), height (4), bit depth (1), colour type (1)
    is_png = data[:8] == _PNG_SIGNATURE and len(data) >= 26
    bit_depth = data[24] if is_png else 8
    try:
        if bit_depth < 8:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return np.asarray(im)
        t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except Exception as e:  # libpng / libjpeg / PIL errors come as RuntimeError, OSError, ValueError ...
        raise ModalityError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None
    # torch.uint16 has few ops (and torchvision < 0.21 returned 16-bit PNGs as int32): go through int32
    arr = t.to(torch.int32).numpy().astype(np.uint16) if bit_depth == 16 else t.numpy()
    arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    return np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


class Modality:
    """Base class of modality plugins.  Subclasses set the class attributes and override hooks."""

    name: ClassVar[str] = ""
    is_label_map: ClassVar[bool] = False
    #: shard keys this modality reads; the first one is its own map (e.g. ``"seg.png"``).
    shard_keys: ClassVar[tuple[str, ...]] = ()
    #: shard keys that, when the own key is missing, let ``derive`` build the map.
    derive_keys: ClassVar[tuple[str, ...]] = ()
    #: a label map that also takes soft class probabilities ``(B, K, H, W)`` float (segmentation)
    accepts_probabilities: ClassVar[bool] = False

    def __init__(self, feature_channels: int = 16, encoder_hidden: int = 32):
        self.feature_channels = feature_channels
        self.encoder_hidden = encoder_hidden

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # record every plugin's constructor arguments (diffusers' register_to_config habit): config() returns
        # them, so a plugin never copies its __init__ arguments into config() by hand
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _recording(cls.__init__)

    # ---- what the map is -------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Number of channels of ``to_channels`` output (the encoder's input)."""
        raise NotImplementedError

    @property
    def raw_channels(self) -> int:
        """Channels of a continuous raw map (ignored for label maps)."""
        return self.channels

    def config(self) -> dict[str, Any]:
        """Options that rebuild this plugin: ``modalities.create(name, **config())``: the arguments it was built
        with, defaults filled in, tuples as lists (JSON)."""
        return dict(getattr(self, "_config", None) or {"feature_channels": self.feature_channels,
                                                       "encoder_hidden": self.encoder_hidden})

    # ---- data --------------------------------------------------------------------------
    def decode(self, sample: Mapping[str, Any]) -> torch.Tensor | None:
        """Read the raw map from a shard sample (bytes per key); ``None`` if the key is absent."""
        raise NotImplementedError

    def shard_format(self) -> str:
        """What a shard sample must hold for this modality, as error messages about bad samples say it."""
        keys = " or ".join(f"'{k}'" for k in self.shard_keys) or "(no shard key)"
        derive = f", or {' / '.join(repr(k) for k in self.derive_keys)} to derive it from" if self.derive_keys else ""
        return f"{keys}: a PNG map of modality '{self.name}' at the image's size{derive}"

    def derive(self, image: torch.Tensor, sample: Mapping[str, Any]) -> torch.Tensor:
        """Build the raw map from the RGB image ``(3, H, W)`` in [0, 1] and the decoded sample.

        The same preprocessing a user runs at inference to make a control from a photo.
        """
        raise ModalityError(
            f"modality '{self.name}': the sample has none of the keys {list(self.shard_keys)} "
            f"and '{self.name}' cannot be derived from the image"
        )

    def derive_for_data(self, image: torch.Tensor, sample: Mapping[str, Any]) -> torch.Tensor:
        """What the data pipeline derives when the shard lacks the map (default: :meth:`derive`).

        A plugin may return several candidate maps stacked on the channel axis for :meth:`augment`
        (training: one drawn per sample) and :meth:`eval_transform` (validation) to choose from;
        both must then return the raw format.
        """
        return self.derive(image, sample)

    def augment(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-only, per-sample, non-geometric augmentation of a raw map (default: none)."""
        return raw

    def eval_transform(self, raw: torch.Tensor, key: str) -> torch.Tensor:
        """Deterministic per-sample preprocessing for validation (default: none)."""
        return raw

    # ---- model side ---------------------------------------------------------------------
    def to_tensor(self, x: Any) -> torch.Tensor:
        """Accept tensor / numpy / PIL input and return the batched raw format, validated."""
        if isinstance(x, Image.Image):
            x = self._pil_to_array(x)
        if isinstance(x, np.ndarray):
            try:
                x = torch.from_numpy(np.ascontiguousarray(x))
            except TypeError:  # object, string, float128 ... arrays
                self._fail("a numeric array (integer, float or bool)", f"a numpy array of dtype {x.dtype}")
        if not isinstance(x, torch.Tensor):
            raise ModalityError(
                f"modality '{self.name}': expected a torch tensor, numpy array or PIL image, got {type(x).__name__}"
            )
        if x.is_complex():
            self._fail("a real-valued map", f"dtype {x.dtype}")
        # integer maps are scaled by their dtype's range, never by their values: a 16-bit map
        # that happens to stay <= 255 is still 16-bit (wider ints: 8-bit values, as before)
        top = 65535.0 if x.dtype == torch.uint16 else 255.0
        if x.dtype == torch.uint16:  # 16-bit PNGs; torch has few uint16 ops
            x = x.int()
        if x.dtype == torch.bool and not self.is_label_map:
            x = x.float()  # a boolean mask means 0 / 1, not 0 / (1 / 255)
        if self.is_label_map:
            if self.accepts_probabilities and x.is_floating_point() and x.ndim in (3, 4):
                x = x[None] if x.ndim == 3 else x  # class probabilities (K, H, W) / (B, K, H, W)
                self.validate(x)
                return x.float()
            if x.ndim == 2:
                x = x[None]
        else:
            if x.ndim == 2:
                x = x[None, None]
            elif x.ndim == 3:
                x = x[None]
            if not x.is_floating_point():
                x = x.float() / top
        self.validate(x)
        return x.long() if self.is_label_map else x.float()

    def _pil_to_array(self, im: Image.Image) -> np.ndarray:
        arr = np.array(im)  # a writable copy (torch warns on read-only arrays)
        if im.mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
            arr = arr.astype(np.uint16)  # 16-bit PNGs may open as PIL mode I (32-bit), depending on the Pillow version
        if self.is_label_map and arr.ndim == 3:  # label maps are single-channel; grey stored as RGB(A) is fine
            if not (arr[..., :3] == arr[..., :1]).all():
                self._fail("a single-channel label image (PIL mode L, P or I)", f"a PIL image of mode {im.mode}")
            arr = arr[..., 0]
        return arr

    def validate(self, x: torch.Tensor) -> None:
        """Check shape, dtype, range and finiteness of a batched raw map."""
        raise NotImplementedError

    def to_channels(self, raw: torch.Tensor) -> torch.Tensor:
        """Batched raw map -> ``(B, channels, H, W)`` float, the encoder's input."""
        raise NotImplementedError

    def build_encoder(self, downsample: int = 1) -> nn.Module:
        """The trainable encoder from ``to_channels`` output to ``feature_channels`` MCM features."""
        return ConvEncoder(self.channels, self.feature_channels, self.encoder_hidden, downsample)

    def loss_weight_map(self, raw: torch.Tensor) -> torch.Tensor | None:
        """Optional: ``(B, 1, H, W)`` in [0, 1], where this map says the most (training's ``map_loss_weight``
        weighs the loss up there); ``None`` (the default): uniform.  A function of the map alone, so the
        weighted loss has the same minimiser per pixel as the plain one."""
        return None

    def resize(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize a batched raw map: nearest for label maps, bilinear (antialiased) for continuous."""
        if tuple(raw.shape[-2:]) == tuple(size):
            return raw
        if self.is_label_map:
            return nn.functional.interpolate(raw[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return nn.functional.interpolate(raw, size=size, mode="bilinear", antialias=True, align_corners=False)

    def visualize(self, raw: torch.Tensor) -> torch.Tensor:
        """Batched raw map -> ``(B, 3, H, W)`` RGB in [0, 1] for grids."""
        raise NotImplementedError

    def example(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A valid random batched raw map ``(B, ...)`` for tests and smoke runs (seeded by ``generator``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({opts})"

    # ---- shared checks ---------------------------------------------------------------
    def _fail(self, expected: str, got: str) -> None:
        raise ModalityError(f"modality '{self.name}': expected {expected}, got {got}")

    def _check_finite(self, x: torch.Tensor) -> None:
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            self._fail("finite values", f"{bad} NaN/Inf values")

    def _check_batch(self, x: torch.Tensor, ndim: int, layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            self._fail(f"a tensor {layout}", type(x).__name__)
        if x.ndim != ndim:
            self._fail(f"shape {layout}", f"shape {tuple(x.shape)}")
        if x.numel() == 0:  # empty batch or a zero-size side
            self._fail(f"a non-empty batch {layout}", f"shape {tuple(x.shape)}")
