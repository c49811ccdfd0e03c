"""Where a library replaced hand-written code, it gives the numbers the hand-written code gave.

Each test keeps a copy of the replaced code as the reference and compares on random inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from datamodules.shard_datamodule import expand_shards
from mcm.evaluation.metrics import (
    confusion_matrix, dilate, frechet_distance, iou_per_class, miou_from_confusion, partial_alignment,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- segmentation: torchmetrics' confusion matrix --------------------------------------------------
def _old_confusion_matrix(pred, target, k, ignore_index=None):
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    t, p = target[keep], pred[keep].clamp(0, k - 1)
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)


@pytest.mark.parametrize("seed", range(5))
def test_confusion_matrix_matches_the_old_one_and_torchmetrics(seed):
    k = 6
    target = torch.randint(0, k, (3, 17, 23), generator=_gen(seed))
    target[torch.rand(target.shape, generator=_gen(seed + 100)) < 0.3] = 255  # unknown pixels
    pred = torch.randint(0, k, target.shape, generator=_gen(seed + 200))
    pred[0, 0, :4] = torch.tensor([-3, 7, 99, 5])  # out-of-range predictions are clamped
    cm = confusion_matrix(pred, target, k, ignore_index=255)
    assert cm.dtype == torch.int64 and torch.equal(cm, _old_confusion_matrix(pred, target, k, 255))
    tm = MulticlassConfusionMatrix(k, ignore_index=255)
    tm.update(pred.clamp(0, k - 1), target)
    assert torch.equal(cm, tm.compute())


def test_absent_classes_are_nan_and_skipped_by_the_mean():
    k = 5
    target = torch.tensor([[[0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 4]]])
    iou = iou_per_class(confusion_matrix(pred, target, k, ignore_index=255))
    assert iou.dtype == torch.float64
    assert iou[:2].tolist() == [0.5, 0.5] and iou[2:].isnan().all()  # class 4 only under an unknown pixel
    assert partial_alignment(pred, target, k)["miou"] == 0.5
    # torchmetrics' macro mIoU skips absent classes too (it reduces in float32)
    jac = MulticlassJaccardIndex(k, average="macro", ignore_index=255)
    jac.update(pred, target)
    assert float(jac.compute()) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_miou_matches_torchmetrics_jaccard(seed):
    k = 8
    target = torch.randint(0, k - 2, (2, 32, 32), generator=_gen(seed))  # classes 6, 7 absent from target
    pred = torch.randint(0, k - 1, (2, 32, 32), generator=_gen(seed + 10))  # class 7 absent everywhere
    jac = MulticlassJaccardIndex(k, average="macro")
    jac.update(pred, target)
    assert miou_from_confusion(confusion_matrix(pred, target, k)) == pytest.approx(float(jac.compute()), rel=1e-6)


# ---- FID: torchmetrics' formula ----------------------------------------------------------------------
def _old_frechet_distance(real, fake):
    r, f = real.double(), fake.double()
    mu_r, mu_f = r.mean(0), f.mean(0)
    cov_r, cov_f = torch.cov(r.T).reshape(r.shape[1], -1), torch.cov(f.T).reshape(f.shape[1], -1)
    covmean = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * covmean)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_frechet_distance_matches_the_old_one(d):
    real = torch.randn(300, d, generator=_gen(d))
    fake = torch.randn(250, d, generator=_gen(d + 1)) * 1.5 + 0.3
    assert frechet_distance(real, fake) == pytest.approx(_old_frechet_distance(real, fake), rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(real[:1], fake)


# ---- dilation: kornia.morphology ---------------------------------------------------------------------
@pytest.mark.parametrize("tolerance", [0, 1, 2, 3])
def test_dilate_matches_max_pool_on_binary_maps(tolerance):
    edges = (torch.rand(2, 1, 19, 24, generator=_gen(tolerance)) > 0.9).float()
    edges[0, 0, 0, 0] = edges[1, 0, -1, -1] = 1.0  # strokes on the border: the padding must not count
    old = F.max_pool2d(edges, 2 * tolerance + 1, stride=1, padding=tolerance) if tolerance else edges
    assert torch.equal(dilate(edges, tolerance), old)
    with pytest.raises(ValueError, match="tolerance"):
        dilate(edges, -1)


# ---- shard lists: webdataset's expand_urls -----------------------------------------------------------
def test_expand_shards_braces_globs_joins_and_env(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").touch()
    braces = expand_shards(str(tmp_path / "s-{000..002}.tar"), "train_shards")
    assert braces == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "s-*.tar"), "train_shards") == braces
    assert expand_shards(f"{braces[0]}::{tmp_path / 's-00{1,2}.tar'}", "x") == braces
    assert expand_shards([braces[0], braces[1]], "x") == braces[:2]
    remote = "pipe:aws s3 cp s3://b/s-{0..1}.tar -"
    assert expand_shards(remote, "x") == ["pipe:aws s3 cp s3://b/s-0.tar -", "pipe:aws s3 cp s3://b/s-1.tar -"]
    monkeypatch.setenv("WDS_SHARD_DIR", str(tmp_path))
    assert expand_shards("${SHARD_DIR}/s-000.tar", "x") == braces[:1]
    monkeypatch.delenv("WDS_SHARD_DIR")
    with pytest.raises(ValueError, match=r"train_shards: cannot expand .*SHARD_DIR"):
        expand_shards("${SHARD_DIR}/s-000.tar", "train_shards")
    with pytest.raises(FileNotFoundError, match=r"val_shards: 1 of 4 shards do not exist: .*s-003\.tar"):
        expand_shards(str(tmp_path / "s-{000..003}.tar"), "val_shards")


def test_one_bit_sketch_png_decodes_strokes_as_one():
    """Regression: a 1-bit sketch PNG (decoded as bool) was divided by 255, strokes 1/255."""
    import io

    import numpy as np
    from PIL import Image

    import modalities

    strokes = np.zeros((8, 8), bool)
    strokes[2, :] = True
    buf = io.BytesIO()
    Image.fromarray(strokes).convert("1").save(buf, format="PNG")
    x = modalities.get("sketch").decode({"sketch.png": buf.getvalue()})
    assert x.shape == (1, 8, 8) and x.max() == 1.0 and x.sum() == 8
