"""The Multimodal Conditioning Module ``M(x_t, p, c, m, t) -> (gamma, beta)`` (Ham et al. 2023, §3).

``p`` is the frozen base's prediction, ``c`` the modality features from each plugin's
encoder (resized to ``x_t``'s spatial size), ``m`` one presence channel per modality.
The backbone is a small diffusers ``UNet2DModel`` over ``[x_t, p, c, m]``; its output layer
is zero-initialised so that at step 0 ``p_hat = p * (1 + gamma) + beta == p`` exactly.
Saved like any diffusers model: ``config.json`` + safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

import modalities as modality_registry
from modalities import ModalityError

from mcm.models.adapter import Adapter, BasePrediction, repeat_batch
from mcm.models.export_checks import WEIGHTS_FILE, check_tensors, tensor_names


def modulate(p: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``p_hat = p + s * (p * gamma + beta)``; at ``s = 1`` this is the paper's ``p * (1 + gamma) + beta``.

    One formula for every ``s`` (a float or a map broadcastable to ``p``), so a map of ones gives exactly
    the float 1 and a map of zeros exactly ``p``.
    """
    return p + strength * (p * gamma + beta)


def project_features(projections: nn.ModuleList, features: list[torch.Tensor], size: tuple[int, int],
                     dtype: torch.dtype) -> list[torch.Tensor]:
    """Each of the base's feature maps through its 1x1 projection, resized (bilinear) to the MCM input's ``size``."""
    return [F.interpolate(proj(f.to(dtype)), size=size, mode="bilinear", align_corners=False)
            for proj, f in zip(projections, features)]


class MultimodalConditioningModule(Adapter, ModelMixin, ConfigMixin):
    """MCM: a small UNet that outputs per-pixel scale ``gamma`` and shift ``beta`` for ``p``.

    Args:
        latent_channels: channels of ``x_t`` and ``p`` (3 for a pixel base, 4 for SD latents).
        modalities: plugin name -> options, e.g. ``{"segmentation": {"num_classes": 6}, "sketch": {}}``.
        downsample: model-space downsampling of the base (1 pixel, 8 for SD); the modality
            encoders downsample raw maps by it.
        block_out_channels: UNet widths per level (paper: 32 x (1, 1, 2, 4)).
        layers_per_block: resnet blocks per level (paper: 2).
        attention_levels: levels (0 = full resolution) with self-attention (paper: 16x16).
        norm_num_groups: group norm groups (must divide every width).
        attention_head_dim: channels per attention head.
        default_strength: the modulation strength sampling uses when called with ``strength=None``
            (measured after training and recorded by ``mcm export --strength``; never folded into weights).
        base_feature_channels: ``None`` (the paper's MCM) or the channels of the frozen base's own features of
            ``x_t`` that the module also reads (``FrozenBase.feature_channels``: a UNet's down blocks and middle
            block, captured in the base's no-grad forward, so they cost no extra base forward). Each is
            projected to ``base_feature_width`` channels by a 1x1 conv, resized to ``x_t``'s size and added to
            the input. Such a module runs the base itself: it cannot train from cached predictions, and
            ``mcm.attach`` refuses it.
        base_feature_width: channels of each projected base feature.
        base_feature_levels: also add the base's features at the MCM's own levels (a sketch-gap variant,
            docs/ablations.md): base down block ``i``'s output to the MCM's down block ``i``'s and the base's middle
            block's to the MCM's middle block, each through a zero-initialised 1x1 conv to that level's width
            and resized to it (ControlNet adds its features at every level of the base; here the other way round).
        condition_feature_channels: ``None`` or the channels of the frozen base's features (the same blocks as
            ``base_feature_channels``) of each *map*, drawn as an image (the plugin's ``visualize``, in [-1, 1]) and
            read by the base at ``t = 0`` under no-grad: a pretrained condition encoder (a sketch-gap variant,
            docs/ablations.md; ControlNet reads a map through a trained copy of the base's encoder). Each map's
            features are projected to ``base_feature_width`` channels, resized to ``x_t``'s size, zeroed where
            the map is absent and added to the input. One more base forward per map and step; pixel-space UNet
            bases only (the drawn map is the base's input, as its images are).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 4, modalities: dict[str, dict[str, Any]] | None = None,
                 downsample: int = 1, block_out_channels: tuple[int, ...] = (32, 32, 64, 128),
                 layers_per_block: int = 2, attention_levels: tuple[int, ...] = (2,), norm_num_groups: int = 8,
                 attention_head_dim: int = 8, default_strength: float = 1.0,
                 base_feature_channels: tuple[int, ...] | None = None, base_feature_width: int = 8,
                 base_feature_levels: bool = False, condition_feature_channels: tuple[int, ...] | None = None):
        super().__init__()
        self.default_strength = float(default_strength)
        if not modalities:
            raise ValueError("MCM needs at least one modality, e.g. modalities={'segmentation': {'num_classes': 6}}")
        # sorted: config.json is written with sorted keys, and the channel layout of the UNet
        # input must not depend on the order a YAML or dict happened to list the modalities in
        self.plugins = modality_registry.build_all({n: modalities[n] for n in sorted(modalities)})
        self.modality_names = list(self.plugins)
        self.encoders = nn.ModuleDict({n: p.build_encoder(downsample) for n, p in self.plugins.items()})
        feat = sum(p.feature_channels for p in self.plugins.values())
        in_channels = 2 * latent_channels + feat + len(self.plugins)
        self.base_feature_proj = None
        if base_feature_channels:
            self.base_feature_proj = nn.ModuleList(nn.Conv2d(c, base_feature_width, 1) for c in base_feature_channels)
            in_channels += base_feature_width * len(base_feature_channels)
        self.condition_feature_proj = None
        if condition_feature_channels:
            if downsample != 1:
                raise ValueError(f"condition_feature_channels: the base reads the maps drawn as images, so it must "
                                 f"work in pixel space (downsample 1, e.g. shapes32); got downsample {downsample}")
            self.condition_feature_proj = nn.ModuleDict({
                name: nn.ModuleList(nn.Conv2d(c, base_feature_width, 1) for c in condition_feature_channels)
                for name in self.modality_names})
            in_channels += base_feature_width * len(condition_feature_channels) * len(self.plugins)
        n = len(block_out_channels)
        down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(n))
        up = tuple("AttnUpBlock2D" if (n - 1 - i) in attention_levels else "UpBlock2D" for i in range(n))
        self.unet = UNet2DModel(in_channels=in_channels, out_channels=2 * latent_channels,
                                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
                                attention_head_dim=attention_head_dim)
        # zero output: gamma = beta = 0, so the module starts as an exact no-op (ControlNet's zero-conv idea)
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)
        self.base_feature_level_proj = None
        self._level_features: list[torch.Tensor] | None = None  # set by modulation() for its hooks, then cleared
        if base_feature_levels:
            if not base_feature_channels:
                raise ValueError("base_feature_levels: needs base_feature_channels (the base's features to add)")
            k = min(n, len(base_feature_channels) - 1)  # down blocks paired in order; the base's middle block last
            blocks = [*self.unet.down_blocks[:k], self.unet.mid_block]
            sources = [*base_feature_channels[:k], base_feature_channels[-1]]
            widths = [*block_out_channels[:k], block_out_channels[-1]]
            self.base_feature_level_proj = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(sources, widths))
            for i, (block, proj) in enumerate(zip(blocks, self.base_feature_level_proj)):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
                block.register_forward_hook(self._add_level_feature(i))

    def _add_level_feature(self, i: int):
        """A forward hook adding the projected base feature ``i`` to a block's output (a down block's hidden
        states and its last skip, which is the same tensor; the middle block's hidden states)."""
        def hook(_module, _inputs, out):
            if self._level_features is None:
                return out
            h = out[0] if isinstance(out, tuple) else out
            f = self.base_feature_level_proj[i](self._level_features[i].to(h.dtype))
            h = h + F.interpolate(f, size=tuple(h.shape[-2:]), mode="bilinear", align_corners=False)
            return (h, (*out[1][:-1], h)) if isinstance(out, tuple) else h
        return hook

    @property
    def uses_base_prediction_only(self) -> bool:
        """True unless it reads the base's features (it then runs the base itself, so no cached predictions)."""
        return self.base_feature_proj is None and self.condition_feature_proj is None

    @property
    def drawn_map_channels(self) -> int:
        """Channels at the end of the state holding the maps drawn as images (3 per modality) for the base to
        read (``condition_feature_channels``), else 0."""
        return 0 if self.condition_feature_proj is None else 3 * len(self.plugins)

    # ---- conditions -> features (independent of t: computed once per sampling run) -----------------
    def encode_conditions(self, conditions: Mapping[str, torch.Tensor], present: torch.Tensor | None,
                          size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """Raw maps -> ``(B, sum(feature_channels) + M, h, w)``: features times presence, then presence maps.

        ``present``: ``(B, M)`` in {0, 1}, column order = ``self.modality_names``; ``None`` means
        "present iff given".  Missing modalities get zero features and presence 0.
        """
        unknown = sorted(set(conditions) - set(self.modality_names))
        if unknown:
            raise ModalityError(f"this MCM was trained on {self.modality_names}; it has no modality {unknown}")
        device, dtype = self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype
        if present is None:
            present = torch.tensor([[float(n in conditions) for n in self.modality_names]], device=device)
            present = present.expand(batch_size, -1)
        present = present.to(device=device, dtype=dtype)
        feats = []
        for j, (name, plugin) in enumerate(self.plugins.items()):
            m = present[:, j, None, None, None]  # (B, 1, 1, 1)
            if name in conditions:
                f = self.encoders[name](plugin.to_channels(conditions[name]).to(device=device, dtype=dtype))
                if tuple(f.shape[-2:]) != tuple(size):
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                feats.append(f * m)
            else:
                feats.append(torch.zeros(batch_size, plugin.feature_channels, *size, device=device, dtype=dtype))
        masks = present[:, :, None, None].expand(-1, -1, *size)  # (B, M, h, w)
        drawn = []
        if self.condition_feature_proj is not None:  # read by the base in controlled_prediction (it holds the base)
            for j, (name, plugin) in enumerate(self.plugins.items()):
                if name in conditions:
                    raw = plugin.resize(conditions[name].to(device), size)
                    drawn.append((plugin.visualize(raw).to(dtype) * 2 - 1) * present[:, j, None, None, None])
                else:
                    drawn.append(torch.zeros(batch_size, 3, *size, device=device, dtype=dtype))
        return torch.cat(feats + [masks] + drawn, dim=1)

    def condition_features(self, base, state: torch.Tensor) -> list[torch.Tensor]:
        """The base's own features of each map drawn as an image (``encode_conditions`` put them at the end of
        ``state``), projected, at the state's size, zero where the map is absent."""
        if base is None or not hasattr(base, "predict_with_features"):
            raise ValueError("this MCM reads the frozen base's features of its maps (condition_feature_channels): "
                             f"pass the FrozenBase it was trained with, got {type(base).__name__}")
        m, r = len(self.plugins), self.drawn_map_channels
        drawn, masks = state[:, -r:], state[:, -r - m:-r]
        t = torch.zeros(state.shape[0], dtype=torch.long, device=state.device)
        out = []
        for j, name in enumerate(self.modality_names):
            _, feats = base.predict_with_features(drawn[:, 3 * j:3 * j + 3], t)  # no-grad, t = 0: a clean image
            projected = project_features(self.condition_feature_proj[name], feats, tuple(state.shape[-2:]), state.dtype)
            out += [f * masks[:, j:j + 1] for f in projected]
        return out

    # ---- the modulation ------------------------------------------------------------------------
    def modulation(self, x_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                   base_features: list[torch.Tensor] | None = None,
                   condition_features: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma, beta)``, each the shape of ``p``, from ``[x_t, p, features]`` (and the projected base features
        of ``x_t`` for a module built with ``base_feature_channels``, the base's projected features of the maps,
        ``condition_features``, for one built with ``condition_feature_channels``)."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.drawn_map_channels:  # the drawn maps were the base's input, not the MCM's
            features = features[:, :-self.drawn_map_channels]
            if condition_features is None:
                raise ValueError("this MCM reads the base's features of its maps (condition_feature_channels): "
                                 "pass condition_features=module.condition_features(base, state)")
        extra = list(condition_features or [])
        if self.base_feature_proj is not None:
            if base_features is None or len(base_features) != len(self.base_feature_proj):
                got = None if base_features is None else len(base_features)
                raise ValueError(f"this MCM reads {len(self.base_feature_proj)} base feature maps "
                                 f"(base_feature_channels={list(self.config.base_feature_channels)}), got {got}")
            extra += project_features(self.base_feature_proj, base_features, tuple(x_t.shape[-2:]), features.dtype)
        h = torch.cat([x_t.to(features.dtype), p.to(features.dtype), features, *extra], dim=1)
        if self.base_feature_level_proj is not None:  # the hooks read them during this forward only
            k = len(self.base_feature_level_proj) - 1
            self._level_features = [*base_features[:k], base_features[-1]]
        try:
            out = self.unet(h, t).sample
        finally:
            self._level_features = None
        gamma, beta = out.float().chunk(2, dim=1)
        return gamma, beta

    def controlled_prediction(self, base, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                              state: torch.Tensor, strength: float | torch.Tensor, base_prediction: BasePrediction
                              ) -> torch.Tensor:
        """The adapter protocol (``mcm.models.adapter``): ``p + s (p gamma + beta)`` on the base's ``p``."""
        feats = None
        if self.base_feature_proj is None:
            p = base_prediction()
        else:  # its own base forward, the features captured in it (a shared p carries no features)
            p, feats = base.predict_with_features(x_t, t, context)
        extra = {} if feats is None else {"base_features": feats}
        if self.condition_feature_proj is not None:  # once per image, before the guidance branches repeat it
            extra["condition_features"] = repeat_batch(self.condition_features(base, state), x_t.shape[0])
        gamma, beta = self.modulation(x_t, p, t, repeat_batch(state, x_t.shape[0]), **extra)
        return modulate(p, gamma, beta, strength)

    # ---- export and checkpoint (the adapter-kind registry, mcm.models.adapter_kinds, asks these) -----------
    @classmethod
    def is_export_dir(cls, path: Path) -> bool:
        """A ``save_pretrained`` directory of this class (``config.json`` naming it, or naming no class)."""
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            return False
        try:
            name = json.loads(cfg.read_text()).get("_class_name")
        except (ValueError, AttributeError):
            return False
        return name in (None, cls.__name__)

    @classmethod
    def load_export(cls, path: Path) -> "MultimodalConditioningModule":
        """The exported MCM, its safetensors checked to hold exactly its tensors (never pickle)."""
        weights = Path(path) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"'{path}': expected the weights in {WEIGHTS_FILE} next to config.json, "
                                    f"found {sorted(p.name for p in Path(path).iterdir())}")
        on_disk = tensor_names(weights)
        try:
            module = cls.from_pretrained(path, use_safetensors=True)
        except ModalityError:  # names the modality already
            raise
        except (OSError, ValueError) as e:  # e.g. a tensor of another shape
            raise ValueError(f"'{path}': cannot load the exported MCM: {e}") from e
        check_tensors(module, weights, on_disk)
        return module

    @classmethod
    def from_checkpoint_config(cls, cfg: dict) -> "MultimodalConditioningModule":
        """An untrained MCM of the config an ``MCMModule`` checkpoint records (its weights are loaded after)."""
        return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})

    def forward(self, x_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor, conditions: Mapping[str, torch.Tensor],
                present: torch.Tensor | None = None, base_features: list[torch.Tensor] | None = None,
                base=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma, beta)`` from raw maps; ``base``: the frozen base, for a module that reads its features of the
        maps (``condition_feature_channels``)."""
        features = self.encode_conditions(conditions, present, tuple(x_t.shape[-2:]), x_t.shape[0])
        cond = None if self.condition_feature_proj is None else self.condition_features(base, features)
        return self.modulation(x_t, p, t, features, base_features, cond)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
