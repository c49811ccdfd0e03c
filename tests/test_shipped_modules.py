"""The modules shipped in the package (issue 4 item 7, issue 6 item 2): they load offline by name and
do what their model cards say, on layouts generated here (split "test": never trained on)."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from datamodules.shapes import make_sample
from mcm.evaluation.judges import load_judge
from mcm.evaluation.metrics.segmentation import segmentation_alignment
from mcm.pipelines import BUILTIN_MODULES, MCMPipeline
from modalities.sketch import detect_edges

pytestmark = pytest.mark.skipif(not all((p / "config.json").is_file() for p in BUILTIN_MODULES.values()),
                                reason="shipped modules not in this checkout")
N = 12


@pytest.fixture(scope="module")
def layouts() -> torch.Tensor:
    return torch.from_numpy(np.stack([make_sample(7, i, 32, "test").seg for i in range(N)])).long()


@functools.cache
def _judge():
    return load_judge("shapes32-segmentation")


def _seg_miou(images: torch.Tensor, maps: torch.Tensor) -> float:
    judge = _judge()
    return segmentation_alignment(judge.predict(images), maps, judge.num_classes)["miou"]


def test_shipped_multimodal_module_follows_segmentation_layouts(layouts):
    """The shipped MCM, given only a segmentation map, puts objects where the map says; the base
    alone (same seeds) does not. The margin is far below the measured one (docs/results.md)."""
    pipe = MCMPipeline.from_pretrained("shapes32")
    seeds = list(range(N))
    with_mcm = pipe(conditions={"segmentation": layouts}, num_inference_steps=20, seeds=seeds, output_type="pt").images
    alone = pipe(conditions={}, num_images=N, num_inference_steps=20, seeds=seeds, output_type="pt").images
    assert with_mcm.shape == alone.shape == (N, 3, 32, 32)
    mcm_miou, base_miou = _seg_miou(with_mcm, layouts), _seg_miou(alone, layouts)
    assert mcm_miou > base_miou + 0.15, (mcm_miou, base_miou)


def test_shipped_compose_modules_compose_without_paired_data(layouts):
    """The segmentation-only and sketch-only modules (trained on disjoint images) compose:
    weight 0 on both is the base exactly; with weights 2 (their card's setting: 600 training steps
    each, they undershoot at 1) the result follows the segmentation map better than the base."""
    seg = MCMPipeline.from_pretrained("shapes32_compose_segmentation")
    assert seg.modules[0].modality_names == ["segmentation"]
    pipe = MCMPipeline.from_pretrained("shapes32", modules=["shapes32_compose_segmentation",
                                                            "shapes32_compose_sketch"], weights=[2.0, 2.0])
    images = torch.from_numpy(np.stack([make_sample(7, i, 32, "test").image for i in range(N)]))
    sketches = detect_edges(images.permute(0, 3, 1, 2).float() / 255)  # (N, 1, H, W) in {0, 1}
    conds = [{"segmentation": layouts}, {"sketch": sketches}]
    seeds = list(range(N))
    composed = pipe(conditions=conds, num_inference_steps=20, seeds=seeds, output_type="pt").images
    pipe.weights = [0.0, 0.0]
    zero = pipe(conditions=conds, num_inference_steps=20, seeds=seeds, output_type="pt").images
    alone = pipe(conditions=[{}, {}], num_images=N, num_inference_steps=20, seeds=seeds, output_type="pt").images
    torch.testing.assert_close(zero, alone)
    assert _seg_miou(composed, layouts) > _seg_miou(alone, layouts) + 0.08  # measured here: 0.32 vs 0.15
