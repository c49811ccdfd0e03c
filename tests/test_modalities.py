"""Modality plugins: every installed modality gets the same contract tests (timm habit),
plus the built-ins' own semantics and third-party discovery through entry points."""
from __future__ import annotations

import io
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import modalities
from modalities import Modality, ModalityError
from modalities.partial_mask import UNKNOWN, hide_regions
from modalities.sketch import detect_edges

NAMES = modalities.list_modalities()
B, H, W = 2, 32, 32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=NAMES)
def plugin(request) -> Modality:
    return modalities.get(request.param)


def test_builtins_installed():
    assert {"segmentation", "sketch", "depth", "partial_mask"} <= set(NAMES)


# ---- contract, looped over every installed modality ---------------------------------------
def test_example_is_valid_and_channels(plugin):
    raw = plugin.example(B, H, W, _gen())
    plugin.validate(raw)
    assert torch.equal(raw, plugin.example(B, H, W, _gen())), "example must be seeded by the generator"
    ch = plugin.to_channels(raw)
    assert ch.shape == (B, plugin.channels, H, W) and ch.dtype == torch.float32
    assert torch.isfinite(ch).all()


@pytest.mark.parametrize("downsample", [1, 8])
def test_encoder_forward_backward(plugin, downsample):
    torch.manual_seed(0)
    enc = plugin.build_encoder(downsample)
    feats = enc(plugin.to_channels(plugin.example(B, H, W, _gen())))
    assert feats.shape == (B, plugin.feature_channels, H // downsample, W // downsample)
    assert torch.isfinite(feats).all()
    feats.square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_visualize(plugin):
    rgb = plugin.visualize(plugin.example(B, H, W, _gen()))
    assert rgb.shape == (B, 3, H, W) and rgb.is_floating_point()
    assert rgb.min() >= 0 and rgb.max() <= 1


def test_config_rebuilds(plugin):
    clone = modalities.get(plugin.name, **plugin.config())
    assert clone.config() == plugin.config() and clone.channels == plugin.channels


def _rejects(plugin: Modality, x: torch.Tensor) -> str:
    with pytest.raises(ModalityError) as err:
        plugin.validate(x)
    msg = str(err.value)
    assert f"'{plugin.name}'" in msg and "expected" in msg, msg
    return msg


def test_validate_rejects_bad_input(plugin):
    raw = plugin.example(B, H, W, _gen())
    _rejects(plugin, raw[0, 0])  # wrong ndim
    _rejects(plugin, raw[None])  # wrong ndim
    _rejects(plugin, raw[:0])  # empty batch
    if plugin.is_label_map:
        bad = raw.clone()
        bad[0, 0, 0] = plugin.channels + 7
        assert str(plugin.channels + 7) in _rejects(plugin, bad)
        _rejects(plugin, raw.float())  # float labels
    else:
        bad = raw.clone()
        bad[0, 0, 0, 0] = float("nan")
        _rejects(plugin, bad)
        _rejects(plugin, raw + 2)  # out of range
        _rejects(plugin, raw.long())  # integer dtype


def test_to_tensor_accepts_numpy_pil_torch(plugin):
    raw = plugin.example(1, H, W, _gen())
    if plugin.is_label_map:
        single = raw[0]  # (H, W)
        inputs = [single, single.numpy(), single.numpy().astype(np.uint8), Image.fromarray(single.numpy().astype(np.uint8))]
        for x in inputs:
            assert torch.equal(plugin.to_tensor(x), raw), type(x)
    else:
        if plugin.raw_channels != 1:
            pytest.skip("PIL/2-D inputs only make sense for single-channel maps")
        single = raw[0]  # (1, H, W)
        for x in [single, single.numpy(), single[0].numpy()]:
            assert torch.allclose(plugin.to_tensor(x), raw), type(x)
        pil = Image.fromarray((single[0].numpy() * 255).round().astype(np.uint8))
        assert torch.allclose(plugin.to_tensor(pil), raw, atol=1 / 255)
    with pytest.raises(ModalityError, match=plugin.name):
        plugin.to_tensor([[0, 1]])


# ---- property test of validate over random shapes, dtypes and values -----------------------
_DTYPES = [np.uint8, np.uint16, np.int16, np.int64, np.float32, np.float64, np.bool_]


@st.composite
def _maps(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), min_size=2, max_size=5).map(tuple))
    if dtype == np.bool_:
        elements = st.booleans()
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        elements = st.integers(max(info.min, -2), min(info.max, 300))
    else:
        elements = st.floats(-0.5, 1.5, width=32) | st.sampled_from([float("nan"), float("inf"), 0.0, 1.0])
    return torch.from_numpy(draw(arrays(dtype, shape, elements=elements)))


def _valid(plugin: Modality, x: torch.Tensor) -> bool | None:
    """Independent statement of the built-ins' rules; ``None`` for unknown plugins."""
    if x.numel() == 0:
        return False
    if plugin.name in ("segmentation", "partial_mask"):
        if x.ndim != 3 or x.is_floating_point() or x.dtype == torch.bool:
            return False
        ok = (x.long() >= 0) & (x.long() < plugin.num_classes)
        if plugin.name == "partial_mask":
            ok |= x.long() == UNKNOWN
        return bool(ok.all())
    if plugin.name in ("sketch", "depth"):
        if x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
            return False
        return bool(torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)
    return None


@settings(max_examples=30, deadline=None)
@given(x=_maps())
def test_validate_property(x):
    for name in NAMES:
        plugin = modalities.get(name)
        try:
            plugin.validate(x)
            accepted = True
        except ModalityError as e:
            assert f"'{name}'" in str(e)
            accepted = False
        expected = _valid(plugin, x)
        if expected is not None:
            assert accepted == expected, (name, x.dtype, tuple(x.shape))
        if accepted:  # whatever validate lets through must make finite channels
            ch = plugin.to_channels(x)
            assert ch.shape == (x.shape[0], plugin.channels, *x.shape[-2:]) and torch.isfinite(ch).all()


# ---- registry --------------------------------------------------------------------------------
def test_unknown_name_lists_installed():
    with pytest.raises(ModalityError) as err:
        modalities.get("segmentaton")
    msg = str(err.value)
    assert all(n in msg for n in NAMES) and "Did you mean 'segmentation'" in msg


def test_none_options_are_dropped():
    assert modalities.get("segmentation", num_classes=None).num_classes == 6
    assert modalities.get("segmentation", num_classes=9).channels == 9
    assert modalities.get("partial_mask", num_classes=9).channels == 10


def test_third_party_plugin_discovery(tmp_path, monkeypatch):
    (tmp_path / "thermal_plugin.py").write_text(textwrap.dedent('''
        import torch
        from modalities import Modality

        class Thermal(Modality):
            name = "thermal"
            shard_keys = ("thermal.png",)

            @property
            def channels(self):
                return 1

            def validate(self, x):
                self._check_batch(x, 4, "(B, 1, H, W)")

            def to_channels(self, raw):
                return raw.float()

            def visualize(self, raw):
                return raw.expand(-1, 3, -1, -1)

            def example(self, batch, height, width, generator=None):
                return torch.rand(batch, 1, height, width, generator=generator)
    '''))
    dist = tmp_path / "thermal_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thermal-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mcm.modalities]\nthermal = thermal_plugin:Thermal\n")
    assert "thermal" not in modalities.list_modalities()
    monkeypatch.syspath_prepend(str(tmp_path))

    assert "thermal" in modalities.list_modalities()
    thermal = modalities.get("thermal", feature_channels=8)
    assert thermal.name == "thermal" and thermal.feature_channels == 8
    enc = thermal.build_encoder(8)
    assert enc(thermal.to_channels(thermal.example(1, 16, 16))).shape == (1, 8, 2, 2)


# ---- built-in semantics ----------------------------------------------------------------------
def test_segmentation_decode_and_one_hot():
    seg = modalities.get("segmentation")
    labels = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    out = seg.decode({"seg.png": _png(labels)})
    assert out.dtype == torch.int64 and torch.equal(out, torch.from_numpy(labels).long())
    assert seg.decode({"png": b""}) is None
    onehot = seg.to_channels(out[None])
    assert torch.equal(onehot.argmax(1)[0], out) and torch.equal(onehot.sum(1), torch.ones(1, 2, 3))
    with pytest.raises(ModalityError, match="0..5"):
        seg.decode({"seg.png": _png(np.full((2, 2), 7, np.uint8))})
    # fixed palette: background dark grey, classes distinct
    colors = seg.visualize(torch.arange(6)[None, None])[0, :, 0].T  # (6, 3)
    assert colors[0].max() < 0.4 and len({tuple(c.tolist()) for c in colors}) == 6
    assert modalities.get("segmentation", num_classes=40).visualize(torch.arange(40)[None, None]).max() <= 1


def test_partial_mask_channels_and_visualize():
    pm = modalities.get("partial_mask", num_classes=3)
    raw = torch.tensor([[[0, 2, UNKNOWN]]])
    ch = pm.to_channels(raw)
    expected = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)  # (K + 1, W)
    assert torch.equal(ch[0, :, 0], expected)
    assert torch.equal(pm.visualize(raw)[0, :, 0, 2], torch.ones(3))  # unknown shown white/checker


def test_partial_mask_augment_hides_but_keeps_known():
    pm = modalities.get("partial_mask")
    full = modalities.get("segmentation").example(1, H, W, _gen(1))[0]
    g = _gen(2)
    for _ in range(20):
        out = pm.augment(full, g)
        pm.validate(out[None])
        unknown = out == UNKNOWN
        assert unknown.any() and (~unknown).any()
        assert torch.equal(out[~unknown], full[~unknown])  # known pixels are unchanged


def test_partial_mask_eval_is_deterministic_per_key():
    pm = modalities.get("partial_mask")
    full = modalities.get("segmentation").example(1, H, W, _gen(1))[0]
    a, b = pm.eval_transform(full, "sample-000001"), pm.eval_transform(full, "sample-000001")
    assert torch.equal(a, b) and (a == UNKNOWN).any()
    others = [pm.eval_transform(full, f"sample-{i:06d}") for i in range(2, 8)]
    assert any(not torch.equal(a, o) for o in others)


def test_partial_mask_derive_from_full_segmentation():
    pm = modalities.get("partial_mask")
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    image = torch.zeros(3, 2, 2)
    assert torch.equal(pm.derive(image, {"seg.png": _png(labels)}), torch.from_numpy(labels).long())
    assert pm.decode({"seg.png": _png(labels)}) is None  # own key is partial.png
    with pytest.raises(ModalityError, match="partial_mask"):
        pm.derive(image, {"png": b""})


def test_hide_regions_public_helper_batched():
    labels = modalities.get("segmentation").example(4, H, W, _gen(3))
    out = hide_regions(labels, _gen(4), object_prob=1.0, rect_prob=0.0)
    for full, part in zip(labels, out):
        assert (part == UNKNOWN).any() and (part != UNKNOWN).any()
        assert len(torch.unique(part[part != UNKNOWN])) == 1  # all classes but one hidden


def _square_image() -> torch.Tensor:
    # grey background with mild noise (std 0.05): Canny at 0.1 / 0.2 would trace the noise
    image = (0.5 + 0.05 * torch.randn(1, H, W, generator=_gen(1))).expand(3, -1, -1).clamp(0, 1).clone()
    image[:, 8:24, 8:24] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # saturated red square
    return image


def test_sketch_derive_outlines_square():
    sketch = modalities.get("sketch")
    edges = sketch.derive(_square_image(), {})
    assert edges.shape == (1, H, W) and set(edges.unique().tolist()) <= {0.0, 1.0}
    e = edges[0]
    border = torch.zeros(H, W, dtype=torch.bool)
    border[6:26, 6:26] = True
    border[10:22, 10:22] = False  # a band of +-2 px around the square's outline
    assert e[border].sum() >= 40, "the square's outline is traced"
    assert e[~border].sum() == 0, "no edges in the interior or the noisy background"
    assert torch.equal(detect_edges(_square_image()[None]), edges[None])  # same detector, batched
    assert detect_edges(_square_image()[None], 0.1, 0.2)[0, 0][~border].sum() > 0  # the test has teeth


def test_sketch_decode_inverts_dark_strokes():
    sketch = modalities.get("sketch")
    paper = np.full((8, 8), 255, np.uint8)
    paper[4, :] = 0  # a black line on white
    out = sketch.decode({"sketch.png": _png(paper)})
    assert out.shape == (1, 8, 8) and out[0, 4].min() == 1 and out.sum() == 8


def test_sketch_augment_stays_valid_and_varies():
    sketch = modalities.get("sketch", dilate_prob=0.5, max_dropout=0.5)
    raw = sketch.example(1, H, W, _gen())[0]
    g = _gen(5)
    outs = [sketch.augment(raw, g) for _ in range(10)]
    for o in outs:
        sketch.validate(o[None])
    assert any(o.sum() < raw.sum() for o in outs) and any(o.sum() > raw.sum() for o in outs)


def test_depth_decode_16_and_8_bit():
    depth = modalities.get("depth")
    d16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    out = depth.decode({"depth.png": _png(d16)})
    assert out.shape == (1, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.from_numpy(d16.astype(np.float32) / 65535))
    out8 = depth.decode({"depth.png": _png(np.array([[0, 255]], dtype=np.uint8))})
    assert torch.equal(out8, torch.tensor([[[0.0, 1.0]]]))
    assert depth.decode({}) is None
    with pytest.raises(ModalityError, match="'depth'.*cannot be derived"):
        depth.derive(torch.zeros(3, 2, 2), {})


def test_16_bit_png_is_scaled_by_its_dtype_not_its_values():
    """Regression: a 16-bit depth map whose values stay <= 255 was divided by 255, not 65535."""
    depth = modalities.get("depth")
    d16 = np.array([[0, 200], [100, 7]], dtype=np.uint16)
    expected = torch.from_numpy(d16.astype(np.float32) / 65535)[None]
    assert torch.allclose(depth.decode({"depth.png": _png(d16)}), expected)
    assert torch.allclose(depth.to_tensor(d16), expected[None])
    assert torch.allclose(depth.to_tensor(torch.from_numpy(d16)), expected[None])  # a torch.uint16 tensor
    assert torch.allclose(depth.to_tensor(Image.fromarray(d16)), expected[None])
    assert depth.to_tensor(d16).max().item() == pytest.approx(200 / 65535)


def test_png_decoding_keeps_raw_values():
    """Palette indices (also of palettes packed under 8 bits) and 1-bit maps decode to their values."""
    from modalities.base import png_bytes_to_array

    for n in (4, 200):  # PIL writes a 4-colour palette with 2 bits per pixel
        ids = (np.arange(16, dtype=np.uint8) % n).reshape(4, 4)
        im = Image.frombytes("P", (4, 4), ids.tobytes())
        im.putpalette([v % 256 for v in range(3 * n)])
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        assert np.array_equal(png_bytes_to_array(buf.getvalue(), "seg"), ids), n
    bits = np.array([[True, False], [False, True]])
    assert np.array_equal(png_bytes_to_array(_png(bits), "seg"), bits)
    rgb = png_bytes_to_array(_png(np.full((2, 2, 3), 100, np.uint8)), "x")
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    with pytest.raises(ModalityError, match="x: not a readable image"):
        png_bytes_to_array(b"not a png", "x")


def test_depth_augment_monotone_in_range():
    depth = modalities.get("depth", noise_std=0.0)
    ramp = torch.linspace(0, 1, 32).expand(1, 4, 32)
    out = depth.augment(ramp, _gen(6))
    depth.validate(out[None])
    assert (out[..., 1:] >= out[..., :-1]).all() and out[..., 0].eq(0).all() and out[..., -1].eq(1).all()
    assert modalities.get("depth").visualize(torch.tensor([[[[0.0, 1.0]]]]))[0, :, 0].sum(0).tolist()[0] > 1.5


def test_to_tensor_16_bit():
    """Regression: 16-bit input crashed in to_tensor (torch has no max() for uint16)."""
    d16 = np.array([[0, 65535]], dtype=np.uint16)
    expected = torch.tensor([[[[0.0, 1.0]]]])
    depth = modalities.get("depth")
    assert torch.equal(depth.to_tensor(d16), expected)
    assert torch.equal(depth.to_tensor(Image.fromarray(d16)), expected)
    assert torch.equal(modalities.get("partial_mask").to_tensor(np.array([[0, 255]], np.uint16)), torch.tensor([[[0, 255]]]))
