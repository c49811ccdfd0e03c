"""Checks on a training batch before it reaches the frozen base and the MCM.

``ShardDataModule`` only yields batches that pass (its bad samples are skipped and counted);
these checks turn what a custom DataModule or a hand-made batch gets wrong into a
``ValueError`` naming the modality, what was expected and what came, instead of a shape
error deep inside a UNet (or, worse, a silent resize of a map that does not fit its image).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

import modalities as modality_registry
from modalities import Modality, ModalityError


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_training_batch(plugins: Mapping[str, Modality], batch: Mapping[str, Any], multiple: int = 1,
                         values: bool = True) -> None:
    """Raise ``ValueError`` unless ``batch`` holds images ``(B, 3, H, W)`` with H, W multiples of ``multiple``
    and, for every modality, a valid raw map of the same batch size and spatial size (raw formats:
    ``modalities.base``).  ``multiple`` is what the pipeline samples at: 8 x the base's downsampling.

    ``values=False`` checks only what the tensors' metadata says (types, shapes, sizes): no value is read back
    from the device, so the check costs no host synchronisation.  The values (finite, in range, the plugins'
    ``validate``) are then the data pipeline's job, which checks every sample where it decodes it.
    """
    images = batch.get("image") if isinstance(batch, Mapping) else None
    if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3 and images.numel()
            and images.is_floating_point()):
        raise ValueError(f"batch['image']: expected a non-empty float tensor (B, 3, H, W) in [-1, 1], "
                         f"got {_describe(images)}")
    if values and not torch.isfinite(images).all():
        raise ValueError(f"batch['image']: expected finite values, got {int((~torch.isfinite(images)).sum())} "
                         f"NaN/Inf values")
    B, size = images.shape[0], tuple(images.shape[-2:])
    if size[0] % multiple or size[1] % multiple:
        raise ValueError(f"batch['image']: expected height and width that are multiples of {multiple} for this base, "
                         f"got {size[0]}x{size[1]}; set data.image_size accordingly")
    check_cached(batch, B, size, multiple, values)
    for name, plugin in plugins.items():
        if name not in batch:
            raise ModalityError(f"modality '{name}': expected batch['{name}'] (the module was built for "
                                f"{list(plugins)}), got a batch with keys {sorted(batch)}; give the data module "
                                f"the same modalities as the model")
        x = batch[name]
        if values:
            plugin.validate(x)  # shape, dtype, range, NaN/Inf
        elif not isinstance(x, torch.Tensor) or x.ndim < 3:
            raise ModalityError(f"modality '{name}': expected a batched tensor map, got {_describe(x)}")
        if x.shape[0] != B or tuple(x.shape[-2:]) != size:
            raise ModalityError(f"modality '{name}': expected {B} map(s) of {size[0]}x{size[1]} (the images' batch "
                                f"and size), got shape {tuple(x.shape)}")


def check_cached(batch: Mapping[str, Any], B: int, size: tuple[int, int], multiple: int, values: bool = True) -> None:
    """Precomputed entries of a batch (cached shards: ``latent`` in model space, ``text_emb``): a float tensor
    per image, the latent at the image size over the base's downsampling, finite."""
    down = max(1, multiple // 8)
    expect = {"latent": (4, f"(B, C, {size[0] // down}, {size[1] // down})"), "text_emb": (3, "(B, L, D)")}
    for key, (ndim, layout) in expect.items():
        if key not in batch:
            continue
        x = batch[key]
        if key == "text_emb" and isinstance(x, Mapping):  # SDXL / SD3: a dict of per-image tensors
            bad = {k: _describe(v) for k, v in x.items() if not (isinstance(v, torch.Tensor) and v.shape[0] == B)}
            if bad:
                raise ValueError(f"batch['text_emb']: expected a tensor per entry for the batch's {B} images, got {bad}")
            continue
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == ndim and x.shape[0] == B):
            raise ValueError(f"batch['{key}']: expected a float tensor {layout} for the batch's {B} images, got "
                             f"{_describe(x)}")
        if key == "latent" and tuple(x.shape[-2:]) != (size[0] // down, size[1] // down):
            raise ValueError(f"batch['latent']: expected latents of {size[0] // down}x{size[1] // down} (the "
                             f"{size[0]}x{size[1]} images over the base's x{down} downsampling), got shape "
                             f"{tuple(x.shape)}; were the shards encoded for another base or image size?")
        if values and not torch.isfinite(x).all():
            raise ValueError(f"batch['{key}']: expected finite values, got {int((~torch.isfinite(x)).sum())} "
                             f"NaN/Inf values")


def check_checkpoint_modalities(saved: Mapping[str, Any] | None, plugins: Mapping[str, Modality]) -> None:
    """Refuse a checkpoint whose MCM was trained on other modalities (or other plugin options, e.g.
    ``num_classes``) than the configured model, naming them, instead of a state-dict key/shape error."""
    if not saved or saved.get("modalities") is None:
        return
    trained = {n: (o or {}) for n, o in dict(saved["modalities"]).items()}
    if sorted(trained) != sorted(plugins):
        differ = sorted(set(trained) ^ set(plugins))
        raise ModalityError(f"modality {', '.join(repr(n) for n in differ)}: the checkpoint's MCM was trained on "
                            f"{sorted(trained)} but the model is configured with {sorted(plugins)}; use the same "
                            f"model.init_args.modalities to resume, or start a new run")
    for name, opts in trained.items():
        then, now = modality_registry.get(name, **opts).config(), plugins[name].config()
        if then != now:
            raise ModalityError(f"modality '{name}': the checkpoint's MCM was trained with options {then} but the "
                                f"model is configured with {now}")
