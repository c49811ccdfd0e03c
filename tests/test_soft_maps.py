"""Soft segmentation maps and sketch detail levels (issue #17 item 6; Ham et al. 2023: "hard or soft
segmentation maps and sketches with varying levels of detail").

Expected values are computed independently: one-hot with numpy, blurs with scipy, bilinear resampling
by hand, Canny through ``detect_edges``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch.nn import functional as F

import modalities
from datamodules import ShardDataModule, write_shapes_shards
from datamodules.shapes import make_sample
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import BUILTIN_MODULES, MCMPipeline
from mcm.training.batch_checks import check_training_batch
from modalities import ModalityError
from modalities.partial_mask import UNKNOWN, hide_regions
from modalities.sketch import detect_edges

K, H, W = 6, 16, 16
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8)
SHIPPED = all((p / "config.json").is_file() for p in BUILTIN_MODULES.values())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_hot_np(labels: torch.Tensor, k: int = K) -> torch.Tensor:
    """``(B, H, W)`` -> ``(B, k, H, W)`` float one-hot, with numpy (not ``F.one_hot``)."""
    return torch.from_numpy(np.eye(k, dtype=np.float32)[labels.numpy()]).permute(0, 3, 1, 2).contiguous()


def _scipy_blur(probs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of each ``(H, W)`` plane, reflect padding, support +-2 sigma (scipy's 'mirror')."""
    arr = probs.numpy().astype(np.float64)
    out = np.stack([gaussian_filter(p, sigma, mode="mirror", truncate=2.0) for p in arr.reshape(-1, *arr.shape[-2:])])
    return torch.from_numpy(out.reshape(arr.shape)).float()


def _layouts(n: int = 2, size: int = H) -> torch.Tensor:
    return torch.from_numpy(np.stack([make_sample(3, i, size, "test").seg for i in range(n)])).long()


def _rejects(plugin, x: torch.Tensor) -> str:
    with pytest.raises(ModalityError) as err:
        plugin.validate(x)
    msg = str(err.value)
    assert f"modality '{plugin.name}'" in msg and "expected" in msg, msg
    return msg


# ---- 1. a one-hot probability map is the hard map, exactly -------------------------------------------------------
@pytest.mark.parametrize("name", ["segmentation", "partial_mask"])
def test_one_hot_probabilities_give_the_hard_maps_channels(name):
    plugin = modalities.get(name)
    hard = plugin.example(3, H, W, _gen())
    onehot = _one_hot_np(hard.where(hard != UNKNOWN, 0))
    if name == "partial_mask":
        onehot = onehot * (hard != UNKNOWN)[:, None]  # unknown pixels: all-zero rows
    assert (hard == UNKNOWN).any() or name == "segmentation"
    plugin.validate(onehot)
    assert torch.equal(plugin.to_channels(onehot), plugin.to_channels(hard))
    assert torch.equal(plugin.visualize(onehot), plugin.visualize(hard))


def test_one_hot_probabilities_give_the_same_mcm_gamma_beta():
    torch.manual_seed(0)
    mcm = MultimodalConditioningModule(latent_channels=3, modalities={"segmentation": {}, "partial_mask": {}}, **SMALL)
    with torch.no_grad():  # the output conv starts at zero (a no-op): make gamma / beta depend on the input
        for p in mcm.parameters():
            p.normal_(0, 0.2)
    seg, part = modalities.get("segmentation").example(2, H, W, _gen(1)), modalities.get("partial_mask").example(
        2, H, W, _gen(2))
    soft = {"segmentation": _one_hot_np(seg),
            "partial_mask": _one_hot_np(part.where(part != UNKNOWN, 0)) * (part != UNKNOWN)[:, None]}
    x, p, t = torch.randn(2, 3, H, W, generator=_gen(3)), torch.randn(2, 3, H, W, generator=_gen(4)), torch.tensor(500)
    with torch.no_grad():
        g_hard, b_hard = mcm(x, p, t, {"segmentation": seg, "partial_mask": part})
        g_soft, b_soft = mcm(x, p, t, soft)
        g_blur, _ = mcm(x, p, t, {**soft, "segmentation": _scipy_blur(soft["segmentation"], 1.0)})
    assert g_hard.abs().max() > 0.01  # the comparison is not between zeros
    assert torch.equal(g_hard, g_soft) and torch.equal(b_hard, b_soft)
    assert not torch.allclose(g_hard, g_blur)  # and soft maps do reach the MCM


# ---- 2. validation ------------------------------------------------------------------------------------------------
def test_probabilities_validation_names_modality_shape_and_problem():
    seg = modalities.get("segmentation")
    probs = _scipy_blur(_one_hot_np(_layouts()), 1.0)  # (2, 6, 16, 16), rows sum to 1
    seg.validate(probs)
    msg = _rejects(seg, probs * 0.9)  # rows sum to 0.9
    assert "summing to 1" in msg and "(2, 6, 16, 16)" in msg and "0.9" in msg and "tolerance 0.001" in msg, msg
    msg = _rejects(seg, probs[:, :5] / probs[:, :5].sum(1, keepdim=True))  # K = 5
    assert "K=6" in msg and "(2, 5, 16, 16)" in msg and "num_classes=6" in msg, msg
    neg = probs.clone()
    neg[0, 0, 0, 0], neg[0, 1, 0, 0] = -0.25, neg[0, 1, 0, 0] + 0.25 + neg[0, 0, 0, 0]  # sum still 1
    msg = _rejects(seg, neg)
    assert "[0, 1]" in msg and "-0.25" in msg and "(2, 6, 16, 16)" in msg, msg
    nan = probs.clone()
    nan[1, 2, 3, 4] = float("nan")
    assert "NaN" in _rejects(seg, nan)
    seg.validate(probs + 5e-4 / K)  # within the tolerance
    # float maps of the hard layout are still refused, naming both accepted formats
    msg = _rejects(seg, _layouts().float())
    assert "integer label map" in msg and "class probabilities (B, K=6, H, W)" in msg, msg


def test_partial_mask_probabilities_are_one_where_known_zero_where_unknown():
    pm = modalities.get("partial_mask")
    probs = _scipy_blur(_one_hot_np(_layouts()), 1.0)
    probs[:, :, :4] = 0  # unknown rows
    pm.validate(probs)
    ch = pm.to_channels(probs)
    assert torch.equal(ch[:, -1], (torch.arange(H) >= 4).float().view(1, H, 1).expand(2, H, W))
    half = probs.clone()
    half[0, :, 8, 8] *= 0.5
    msg = _rejects(pm, half)
    assert "or all zero" in msg and "0.5" in msg and "(2, 6, 16, 16)" in msg, msg
    # the hard rule is unchanged; soft maps are not given K + 1 channels
    assert "K=6" in _rejects(pm, torch.cat([probs, ch[:, -1:]], 1))


def test_to_tensor_takes_probabilities_single_or_batched_torch_or_numpy():
    seg = modalities.get("segmentation")
    probs = _scipy_blur(_one_hot_np(_layouts(1)), 1.5)  # (1, 6, H, W)
    for x in (probs, probs[0], probs[0].numpy(), probs.double().numpy(), probs.half()):
        out = seg.to_tensor(x)
        assert out.dtype == torch.float32 and out.shape == (1, K, H, W)
        torch.testing.assert_close(out, probs, atol=1e-3, rtol=0)
    assert torch.equal(seg.to_tensor(_layouts(1)[0]), _layouts(1))  # hard maps as before
    with pytest.raises(ModalityError, match="summing to 1"):
        seg.to_tensor(probs[0] * 2 / 3)


# ---- 3. resizing ---------------------------------------------------------------------------------------------------
def test_resize_of_probabilities_is_bilinear_and_keeps_rows_summing_to_one():
    seg = modalities.get("segmentation")
    labels = torch.tensor([[0, 0, 1, 1]]).expand(4, 4)[None]  # (1, 4, 4): left class 0, right class 1
    up = seg.resize(_one_hot_np(labels), (4, 8))
    # bilinear, align_corners=False: output x' samples the source at (x' + 0.5) / 2 - 0.5
    expected_class0 = torch.tensor([1, 1, 1, 0.75, 0.25, 0, 0, 0])
    torch.testing.assert_close(up[0, 0, 0], expected_class0)
    torch.testing.assert_close(up[0, 1, 0], 1 - expected_class0)
    probs = _scipy_blur(_one_hot_np(_layouts(2, 32)), 1.0)
    for size in [(16, 16), (48, 40), (13, 29)]:
        r = seg.resize(probs, size)
        assert r.shape == (2, K, *size)
        torch.testing.assert_close(r.sum(1), torch.ones(2, *size), atol=1e-5, rtol=0)
        seg.validate(r)
    hard = seg.resize(_layouts(), (32, 32))  # hard maps: nearest, as before
    assert hard.dtype == torch.int64 and torch.equal(hard, _layouts().repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_partial_mask_resize_keeps_rows_one_or_zero():
    pm = modalities.get("partial_mask")
    probs = _scipy_blur(_one_hot_np(_layouts(2, 32)), 1.0)
    probs[:, :, :, :11] = 0  # unknown left part
    r = pm.resize(probs, (20, 20))
    sums = r.sum(1)
    ok = ((sums - 1).abs() < 1e-5) | (sums == 0)
    assert ok.all()
    pm.validate(r)
    known = sums > 0.5  # the known mask resampled like nearest: unknown on the left, known on the right
    assert not known[:, :, :6].any() and known[:, :, 8:].all()


# ---- 4. the soft augmentation ------------------------------------------------------------------------------------
def test_soft_augmentation_is_off_by_default():
    seg, pm = modalities.get("segmentation"), modalities.get("partial_mask")
    assert seg.soft_prob == 0.0 and pm.soft_prob == 0.0
    raw = _layouts(1)[0]
    g, ref = _gen(7), _gen(7)
    out = seg.augment(raw, g)
    assert out is raw and torch.equal(g.get_state(), ref.get_state())  # untouched, nothing drawn
    # partial mask: exactly the former augmentation (hide_regions), and the generator is left where it left it
    g = _gen(8)
    out, before = pm.augment(raw, g), hide_regions(raw, ref.manual_seed(8), 0.5, 0.5)
    assert out.dtype == torch.int64 and torch.equal(out, before) and torch.equal(g.get_state(), ref.get_state())


def test_soft_augmentation_equals_a_hand_computed_blur():
    seg = modalities.get("segmentation", soft_prob=1.0, soft_sigma=(1.0, 1.0))
    raw = _layouts(1)[0]
    out = seg.augment(raw, _gen(0))
    expected = _scipy_blur(_one_hot_np(raw[None]), 1.0)[0]
    assert out.shape == (K, H, W) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sum(0), torch.ones(H, W), atol=1e-5, rtol=0)
    assert 0 < ((out > 0) & (out < 1)).float().mean() < 0.9  # soft at boundaries, one-hot inside regions
    # soft_prob 0.5: some samples blurred, the rest one-hot, all probabilities (a batch stacks)
    half = modalities.get("segmentation", soft_prob=0.5, soft_sigma=(0.5, 2.0))
    outs = [half.augment(raw, _gen(s)) for s in range(20)]
    one_hot = [torch.equal(o, _one_hot_np(raw[None])[0]) for o in outs]
    assert 3 <= sum(one_hot) <= 17
    half.validate(torch.stack(outs))
    with pytest.raises(ValueError, match="soft_prob"):
        modalities.get("segmentation", soft_prob=1.5)


def test_soft_partial_augmentation_normalises_over_known_pixels():
    pm = modalities.get("partial_mask", soft_prob=1.0, soft_sigma=(1.0, 1.0))
    raw = _layouts(1)[0]
    out = pm.augment(raw, _gen(3))
    hidden = hide_regions(raw, _gen(3), 0.5, 0.5)  # the same draws come first
    known = (hidden != UNKNOWN).float()
    onehot = _one_hot_np(hidden.where(hidden != UNKNOWN, 0)[None])[0] * known
    expected = torch.where(known > 0, _scipy_blur(onehot, 1.0) / _scipy_blur(known[None], 1.0), 0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    sums = out.sum(0)
    assert torch.equal(sums == 0, known == 0) and ((sums - 1).abs()[known > 0] < 1e-5).all()
    pm.validate(out[None])


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(out, train=8, val=4, size=32, shard_size=8, workers=1)
    return out


def _train_batch(shapes_dir: Path, mods: dict) -> dict:
    dm = ShardDataModule(train_shards=str(shapes_dir / "train-*.tar"), modalities=mods, batch_size=4, num_workers=0,
                         crop_scale=(1.0, 1.0), hflip=0.0, shuffle_buffer=1)
    return next(iter(dm.train_dataloader()))


def test_training_batches_hard_by_default_soft_when_asked(shapes_dir):
    sk = {"max_dropout": 0.0, "dilate_prob": 0.0}
    default = _train_batch(shapes_dir, {"segmentation": {}, "partial_mask": {}, "sketch": sk})
    explicit = _train_batch(shapes_dir, {"segmentation": {"soft_prob": 0.0}, "partial_mask": {"soft_prob": 0.0},
                                         "sketch": {**sk, "detail_levels": None}})
    for name in ("segmentation", "partial_mask", "sketch"):
        assert torch.equal(default[name], explicit[name])
    images = (default["image"] + 1) / 2
    seg = default["segmentation"]
    assert seg.dtype == torch.int64 and seg.shape == (4, 32, 32)
    assert default["partial_mask"].dtype == torch.int64
    keys = default["key"]
    truth = torch.from_numpy(np.stack([make_sample(0, int(k.split("_")[-1]), 32, "train").seg for k in keys])).long()
    assert torch.equal(seg, truth)  # no crop, no flip: the shard's map itself
    assert torch.equal(default["sketch"], detect_edges(images))  # derived at the fixed pair
    soft = _train_batch(shapes_dir, {"segmentation": {"soft_prob": 1.0, "soft_sigma": [1.0, 1.0]}})
    probs = soft["segmentation"]
    assert probs.dtype == torch.float32 and probs.shape == (4, K, 32, 32)
    torch.testing.assert_close(probs, _scipy_blur(_one_hot_np(truth), 1.0), atol=1e-6, rtol=0)
    check_training_batch({"segmentation": modalities.get("segmentation")}, soft)  # training accepts it


# ---- 5. sketch detail levels -------------------------------------------------------------------------------------
LEVELS = [[0.45, 0.9], [0.15, 0.3], [0.3, 0.6]]


def _image(i: int = 0, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(make_sample(5, i, size, "test").image).permute(2, 0, 1).float() / 255


def test_sketch_detail_levels_off_by_default():
    sketch = modalities.get("sketch")
    assert sketch.detail_levels is None and sketch.stroke_width_range is None
    img = _image()
    derived = sketch.derive_for_data(img, {})
    assert torch.equal(derived, detect_edges(img[None])[0]) and derived.shape == (1, 32, 32)
    assert torch.equal(sketch.eval_transform(derived, "k"), derived)
    # a shard's own sketch.png (1 channel) is augmented the same with or without levels
    levels = modalities.get("sketch", detail_levels=LEVELS)
    for s in range(3):
        assert torch.equal(sketch.augment(derived, _gen(s)), levels.augment(derived, _gen(s)))


def test_sketch_detail_levels_draw_a_configured_pair_per_sample():
    sketch = modalities.get("sketch", detail_levels=LEVELS, max_dropout=0.0, dilate_prob=0.0)
    img = _image(1)
    by_level = [detect_edges(img[None], lo, hi)[0] for lo, hi in LEVELS]
    assert len({int(e.sum()) for e in by_level}) == 3  # the levels are told apart (sparse < default < dense)
    cands = sketch.derive_for_data(img, {})
    assert cands.shape == (4, 32, 32)
    assert torch.equal(cands[:1], detect_edges(img[None], 0.3, 0.6)[0])  # first: the fixed pair
    assert torch.equal(sketch.eval_transform(cands, "k"), cands[:1])  # validation: the fixed pair
    picked = []
    for s in range(24):
        out = sketch.augment(cands, _gen(s))
        assert out.shape == (1, 32, 32)
        assert torch.equal(out, sketch.augment(cands, _gen(s)))  # seeded
        match = [i for i, e in enumerate(by_level) if torch.equal(out, e)]
        assert len(match) == 1, s
        picked.append(match[0])
    assert set(picked) == {0, 1, 2}
    sketch.validate(out[None])
    with pytest.raises(ValueError, match="detail_levels"):
        modalities.get("sketch", detail_levels=[[0.6, 0.3]])


def test_sketch_detail_levels_through_the_data_module(shapes_dir):
    mods = {"sketch": {"detail_levels": LEVELS[:2], "max_dropout": 0.0, "dilate_prob": 0.0}}
    batch = _train_batch(shapes_dir, mods)
    images = (batch["image"] + 1) / 2
    assert batch["sketch"].shape == (4, 1, 32, 32)
    for i in range(4):
        got = batch["sketch"][i:i + 1]
        assert any(torch.equal(got, detect_edges(images[i:i + 1], lo, hi)) for lo, hi in LEVELS[:2]), i


def test_stroke_width_dilates_or_erodes():
    sketch = modalities.get("sketch", stroke_width_range=(-1, 2), max_dropout=0.0, dilate_prob=0.0)
    x = torch.zeros(1, 12, 12)
    x[0, 3:8, 2:9] = 1  # a thick stroke
    x[0, 10, :] = 1  # a 1-pixel one
    thick = sketch.change_stroke_width(x, 1)
    assert torch.equal(thick, F.max_pool2d(x[None], 3, stride=1, padding=1)[0])
    thin = sketch.change_stroke_width(x, -1)
    expected = torch.zeros_like(x)
    expected[0, 4:7, 3:8] = 1  # a 3x3 erosion with zeros beyond the border: the thin stroke vanishes
    assert torch.equal(thin, expected)
    assert torch.equal(sketch.change_stroke_width(x, 2), F.max_pool2d(x[None], 5, stride=1, padding=2)[0])
    sums = {float(sketch.augment(x, _gen(s)).sum()) for s in range(20)}
    assert sums == {float(v.sum()) for v in (thin, x, thick, sketch.change_stroke_width(x, 2))}


# ---- 6. sampling through the pipeline --------------------------------------------------------------------------
@pytest.mark.skipif(not SHIPPED, reason="shipped modules not in this checkout")
def test_pipeline_samples_from_probability_maps():
    pipe = MCMPipeline.from_pretrained("shapes32")
    labels = _layouts(2, 32)
    seeds = [0, 1]
    hard = pipe(conditions={"segmentation": labels}, num_inference_steps=3, seeds=seeds, output_type="pt").images
    onehot = pipe(conditions={"segmentation": _one_hot_np(labels)}, num_inference_steps=3, seeds=seeds, output_type="pt").images
    assert torch.equal(hard, onehot)
    soft = pipe(conditions={"segmentation": _scipy_blur(_one_hot_np(labels), 1.5).numpy()}, num_inference_steps=3,
                seeds=seeds, output_type="pt").images
    assert soft.shape == (2, 3, 32, 32) and torch.isfinite(soft).all() and 0 <= soft.min() and soft.max() <= 1
    assert (soft - hard).abs().max() > 1e-3
    with pytest.raises(ModalityError, match="summing to 1"):
        pipe(conditions={"segmentation": _one_hot_np(labels) * 0.5}, num_inference_steps=1, seeds=seeds, output_type="pt").images


# ---- 7. the measurement helper's pieces (its run is measured by hand: docs in its module) ----------------------
def test_detail_levels_helper_options_and_soft_maps():
    from mcm.evaluation import detail_levels as D

    a, ev = D.parse_args(["--mcm", "shapes32", "--data", "x.tar", "--n", "16", "--steps", "10", "--out", "o",
                          "--soft-sigma", "1", "2", "--level", "thin", "0.5", "0.8"])
    assert a.soft_sigma == [1.0, 2.0] and ev.n == 16 and ev.steps == 10 and ev.mcm == ["shapes32"]
    assert ev.seeds == [0, 1] and ev.sketch_tolerance == 1  # mcm evaluate's defaults
    assert D.levels_for({"low_threshold": 0.2, "high_threshold": 0.5}, None) == [
        ("sparse", 0.45, 0.9), ("default", 0.2, 0.5), ("dense", 0.15, 0.3)]
    assert D.levels_for({}, a.level) == [("thin", 0.5, 0.8)]
    with pytest.raises(ValueError, match="--level"):
        D.levels_for({}, [["bad", "0.8", "0.5"]])
    labels = _layouts(2)
    torch.testing.assert_close(D.soft_segmentation(labels, K, 1.0), _scipy_blur(_one_hot_np(labels), 1.0),
                               atol=1e-6, rtol=0)
    md = D.markdown({"mcm": ["m"], "n": 2, "data": "d", "seeds": [0], "steps": 1, "strength": 1.0, "rows": [
        {"modality": "sketch", "input": "sparse", "low_threshold": 0.45, "high_threshold": 0.9, "edge_density": 0.1,
         "sketch_f1": 0.5, "sketch_precision": None, "sketch_recall": 0.25},
        {"modality": "segmentation", "input": "hard", "seg_miou": 0.8125, "seg_pixel_acc": 0.9}]})
    assert "| sparse | (0.45, 0.9) | 0.100 | 0.500 | — | 0.250 |" in md and "| hard | 0.812 | 0.900 |" in md
