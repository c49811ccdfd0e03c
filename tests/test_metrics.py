"""Metrics against hand-computed cases: perfect = 1 / 0 error, shifted lower, random near chance, invariances."""
from __future__ import annotations

import json

import pytest
import torch

from mcm.evaluation.metrics import (
    CLIPScore, DepthAlignment, Diversity, SegmentationAlignment, SketchAlignment, clip_score, delta_accuracy,
    depth_alignment, diversity, edge_alignment, frechet_distance, inception_fid, judge_fid, judge_kid,
    load_open_clip, partial_alignment, segmentation_alignment, sketch_alignment, ssi_rmse,
)


def _blocks(seed: int, b: int = 4, size: int = 32, k: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, k, (b, size // 8, size // 8), generator=g)
    return cells.repeat_interleave(8, 1).repeat_interleave(8, 2)


# ---- segmentation ------------------------------------------------------------------------------------
def test_segmentation_hand_computed():
    target = torch.tensor([[[0, 1], [1, 1]]])
    pred = torch.tensor([[[0, 1], [0, 1]]])
    # confusion rows=target: [[1, 0], [1, 2]]; IoU0 = 1/2, IoU1 = 2/3
    out = segmentation_alignment(pred, target, num_classes=2)
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["pixel_acc"] == pytest.approx(3 / 4)


def test_segmentation_judge_other_label_counts_as_a_miss():
    target = torch.tensor([[[0, 1], [1, 1]]])
    pred = torch.tensor([[[0, 1], [255, 1]]])  # the judge saw "none of the module's classes" at one class-1 pixel
    # IoU0 = 1/1, IoU1 = 2/3 (the 255 pixel is a false negative of class 1, no false positive anywhere); acc 3/4
    out = segmentation_alignment(pred, target, num_classes=2, pred_other=255)
    assert out["miou"] == pytest.approx((1 + 2 / 3) / 2) and out["pixel_acc"] == pytest.approx(3 / 4)
    part = partial_alignment(pred, torch.tensor([[[255, 1], [1, 1]]]), num_classes=2, pred_other=255)
    assert part["miou"] == pytest.approx(2 / 3) and part["pixel_acc"] == pytest.approx(2 / 3)  # unknown skipped


def test_segmentation_perfect_shifted_random():
    target = _blocks(0)
    perfect = segmentation_alignment(target, target, 6)
    assert perfect == {"miou": 1.0, "pixel_acc": 1.0}
    shifted = segmentation_alignment(torch.roll(target, 3, dims=-1), target, 6)
    assert shifted["miou"] < 0.9 and shifted["pixel_acc"] < 0.95
    rand = torch.randint(0, 6, (8, 64, 64), generator=torch.Generator().manual_seed(1))
    rand_t = torch.randint(0, 6, (8, 64, 64), generator=torch.Generator().manual_seed(2))
    chance = segmentation_alignment(rand, rand_t, 6)
    assert chance["pixel_acc"] == pytest.approx(1 / 6, abs=0.01)
    assert chance["miou"] == pytest.approx(1 / 11, abs=0.01)  # IoU of independent uniform maps: 1 / (2K - 1)


def test_segmentation_logits_and_accumulation():
    target = _blocks(3)
    logits = torch.nn.functional.one_hot(target, 6).permute(0, 3, 1, 2).float()
    assert segmentation_alignment(logits, target, 6)["miou"] == 1.0
    pred = torch.roll(target, 2, dims=-2)
    m = SegmentationAlignment(6)
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    assert m.compute() == pytest.approx(segmentation_alignment(pred, target, 6))


def test_partial_mask_counts_known_pixels_only():
    target = _blocks(4)
    pred = target.clone()
    pred[:, :16] = (pred[:, :16] + 1) % 6  # wrong on the top half
    partial = target.clone()
    partial[:, :16] = 255  # ... which is unknown
    assert partial_alignment(pred, partial, 6) == {"miou": 1.0, "pixel_acc": 1.0}
    assert segmentation_alignment(pred, target, 6)["pixel_acc"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside 0..5"):
        segmentation_alignment(pred, partial, 6)  # 255 without ignore_index is an error


# ---- sketch ------------------------------------------------------------------------------------------
def _line(x: int, size: int = 32) -> torch.Tensor:
    e = torch.zeros(1, 1, size, size)
    e[..., 4:28, x] = 1
    return e


def test_edge_alignment_tolerance():
    assert edge_alignment(_line(10), _line(10), tolerance=1) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_alignment(_line(11), _line(10), tolerance=1)["f1"] == 1.0  # within tolerance
    far = edge_alignment(_line(14), _line(10), tolerance=1)
    assert far["f1"] == 0.0
    assert edge_alignment(_line(11), _line(10), tolerance=0)["f1"] == 0.0
    empty = edge_alignment(torch.zeros(1, 1, 32, 32), _line(10))
    assert empty["recall"] == 0.0 and empty["f1"] == 0.0


def test_sketch_alignment_uses_the_plugin_detector():
    from modalities.sketch import detect_edges

    img = torch.full((2, 3, 32, 32), 0.5)
    img[:, 0, 8:24, 8:24] = 1.0  # a red square
    img[:, 1:, 8:24, 8:24] = 0.0
    sketch = detect_edges(img)
    assert sketch.sum() > 0
    assert sketch_alignment(img, sketch)["f1"] == 1.0
    moved = torch.roll(img, 5, dims=-1)
    assert sketch_alignment(moved, sketch)["f1"] < 0.6
    m = SketchAlignment(tolerance=1)
    m.update(img, sketch)
    m.update(moved, sketch)
    assert 0.3 < m.compute()["f1"] < 1.0


# ---- depth -------------------------------------------------------------------------------------------
def test_depth_scale_shift_invariance():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(3, 1, 16, 16, generator=g) * 0.9 + 0.05
    for a, b in ((1.0, 0.0), (2.5, -0.3), (0.1, 0.7)):
        assert ssi_rmse(a * d + b, d).max() < 1e-6  # float32 rounding of a * d + b
        assert delta_accuracy(a * d + b, d).min() == 1.0
    out = depth_alignment(torch.rand(3, 1, 16, 16, generator=g), d)
    assert out["ssi_rmse"] > 0.1 and out["delta1"] < 0.8
    reversed_ = ssi_rmse(1 - d, d)  # near and far swapped: no negative scale rescues it
    assert torch.allclose(reversed_, d.double().flatten(1).std(1, unbiased=False))
    flipped = depth_alignment(d.flip(-1), d)  # right values, wrong places
    assert 0 < flipped["ssi_rmse"] < out["ssi_rmse"] + 0.1


def test_depth_guards():
    d = torch.zeros(2, 1, 8, 8)  # all nearest: delta ratios would divide by 0
    d[1, ..., :4] = 1.0
    const = torch.full_like(d, 0.3)  # no variance: scale 0, shift = target mean
    out = depth_alignment(const, d)
    assert all(v == v for v in out.values())  # no NaN
    assert ssi_rmse(const, d)[0] == 0.0 and ssi_rmse(const, d)[1] == pytest.approx(0.5)
    m = DepthAlignment()
    m.update(const, d)
    assert m.compute() == pytest.approx(out)


# ---- diversity, FID / KID ----------------------------------------------------------------------------
def test_diversity():
    x = torch.rand(1, 4, 3, 8, 8)
    assert diversity(torch.cat([x, x, x])) == 0.0
    assert diversity(torch.cat([x, (x + 0.5)])) == pytest.approx(0.5)
    m = Diversity()
    m.update(torch.cat([x, x + 0.25]))
    assert m.compute() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        diversity(x)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(f, f)) < 1e-6
    assert frechet_distance(f, f + 1.0) == pytest.approx(8.0, rel=1e-6)  # mean shift of 1 in 8 dims


class ColourStats:
    """A judge is anything with ``features(images)``: here per-channel mean and std (6-d)."""

    def features(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


def test_judge_fid_kid():
    imgs = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(1)) ** 2
    fid = judge_fid(ColourStats())
    fid.update(imgs, real=True)
    fid.update(imgs, real=False)
    assert abs(float(fid.compute())) < 1e-6
    fid.reset()
    fid.update(imgs, real=True)
    fid.update(imgs * 0.5, real=False)
    assert float(fid.compute()) > 0.01
    kid = judge_kid(ColourStats(), subset_size=10, subsets=5)
    kid.update(imgs, real=True)
    kid.update(imgs, real=False)
    mean, _ = kid.compute()
    assert abs(float(mean)) < 1e-3
    assert float(kid.compute()[0]) == float(mean)  # seeded subsets: repeatable


def test_judge_unet_features_for_fid():
    from mcm.evaluation.judges.networks import JudgeUNet

    judge = JudgeUNet(widths=(8, 8, 8, 16)).eval()
    fid = judge_fid(judge)  # num_features read from the judge: no probe forward
    assert fid.inception.num_features == 16
    assert judge.features(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    assert judge.predict(torch.rand(2, 3, 16, 16)).shape == (2, 16, 16)  # resized to 32 and back


def test_inception_fid_never_downloads(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        inception_fid(tmp_path / "missing.pth")


# ---- CLIP score on a tiny random open_clip model --------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    config = d / "mcm-test-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("mcm-test-tiny-clip")  # random init, no pretrained tag: no download
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return config, ckpt


def test_clip_score_tiny_model(tiny_clip):
    config, ckpt = tiny_clip
    model, tok = load_open_clip("mcm-test-tiny-clip", ckpt, config=config)
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a blue square", "an empty scene"]
    s = clip_score(model, tok, imgs, texts)
    assert 0.0 <= s <= 100.0
    assert clip_score(model, tok, imgs, texts) == s  # deterministic
    m = CLIPScore(model, tok)
    m.update(imgs[:2], texts[:2])
    m.update(imgs[2:], texts[2:])
    assert m.compute() == pytest.approx(s, abs=1e-4)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_open_clip("mcm-test-tiny-clip", ckpt.parent / "missing.pt")


def test_one_foreground_iou_with_one_rule_for_empty_maps():
    """Three copies disagreed on empty maps (1.0 in the app, NaN in the regional figures); one function now."""
    from modalities.masks import foreground_iou, mask_iou

    empty, full = torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long)
    half = torch.zeros(1, 4, 4, dtype=torch.long)
    half[:, :, :2] = 3
    got = foreground_iou(torch.cat([empty, full, half, empty]), torch.cat([empty, half, half, full]))
    assert got.tolist() == [1.0, 0.5, 1.0, 0.0]
    assert mask_iou(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)).tolist() == [1.0, 1.0]
