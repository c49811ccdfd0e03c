"""Annotators and judges from local ``transformers`` models (docs/judges.md): tiny random SegFormer and DPT
saved with ``save_pretrained`` and loaded back through the code path a user's checkpoint takes;
every value is recomputed here from the model's own output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_fixtures import png_array, read_shard_members
from torch.nn import functional as F

from modalities.annotators import IGNORE, AnnotatorError, LabelMap, load_depth_model, load_segmenter

from tiny_models import TINY_SEGMENTER_LABELS as LABELS


def _own_segformer(path: Path, images: torch.Tensor) -> torch.Tensor:
    """The segmenter's logits upsampled to the images, straight from transformers (not our code)."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    model = SegformerForSemanticSegmentation.from_pretrained(path).eval()
    pv = SegformerImageProcessor.from_pretrained(path)(images=list(images), return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        logits = model(**pv).logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _own_dpt(path: Path, images: torch.Tensor) -> torch.Tensor:
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    model = DPTForDepthEstimation.from_pretrained(path).eval()
    pv = DPTImageProcessor.from_pretrained(path)(images=list(images), return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        d = model(**pv).predicted_depth[:, None]
    return F.interpolate(d, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ---- segmenter ------------------------------------------------------------------------------------------
def test_segmenter_ids_are_the_argmax_and_probabilities_sum_to_one(seg_dir):
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    logits = _own_segformer(seg_dir, images)
    seg = load_segmenter(seg_dir)
    assert seg.num_classes == seg.num_labels == 4 and seg.id2label == LABELS
    ids = seg.segment(images)
    assert ids.shape == (3, 20, 24) and ids.dtype == torch.int64
    assert torch.equal(ids, logits.argmax(1))
    assert len(torch.unique(ids)) >= 2  # the jittered model is not constant: the check means something
    probs = seg.probabilities(images)
    assert torch.allclose(probs.sum(1), torch.ones(3, 20, 24), atol=1e-5)
    assert torch.allclose(probs, logits.softmax(1), atol=1e-5)
    # uint8 input in [0, 255] reads as the same float image
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert torch.equal(seg.segment(as_uint8), _own_segformer(seg_dir, as_uint8.float() / 255).argmax(1))


def test_label_map_applies_to_ids_and_probabilities(seg_dir, tmp_path):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    logits = _own_segformer(seg_dir, images)
    spec = tmp_path / "labels.json"
    spec.write_text(json.dumps({"person": 1, "2": 2, "sky": "ignore"}))  # a name, an id, an ignored class
    seg = load_segmenter(seg_dir, spec, num_classes=3)
    assert seg.label_map.lut.tolist() == [0, 1, 2, IGNORE] and seg.num_classes == 3
    own = logits.argmax(1)
    expected = torch.tensor([0, 1, 2, IGNORE])[own]
    assert torch.equal(seg.segment(images), expected)
    p = logits.softmax(1)  # wall -> 0, person -> 1, car -> 2, sky dropped, renormalised
    mapped = torch.stack([p[:, 0], p[:, 1], p[:, 2]], 1) / (1 - p[:, 3:4])
    assert torch.allclose(seg.probabilities(images), mapped, atol=1e-5)
    # YAML, structured: unmapped classes ignored; person and car merged into class 1
    yml = tmp_path / "labels.yaml"
    yml.write_text("num_classes: 2\nunmapped: ignore\nclasses:\n  person: 1\n  car: 1\n  wall: 0\n")
    assert load_segmenter(seg_dir, yml).label_map.lut.tolist() == [0, 1, 1, IGNORE]


def test_label_map_errors_name_both_label_sets(seg_dir, tmp_path):
    with pytest.raises(AnnotatorError, match=r"'persn' is not a label of the segmenter.*1=person.*"
                                             r"Did you mean 'person'"):
        LabelMap.from_spec({"persn": 1}, LABELS, 3)
    with pytest.raises(AnnotatorError, match=r"\{'car': 5\} map to module class ids >= num_classes=3.*ids 0\.\.2 "
                                             r"\(bg, person, car\).*0=wall, 1=person, 2=car, 3=sky"):
        LabelMap.from_spec({"classes": {"car": 5}, "class_names": ["bg", "person", "car"]}, LABELS, 3)
    with pytest.raises(AnnotatorError, match="segmenter class id 7 does not exist"):
        LabelMap.from_spec({"7": 1}, LABELS)
    with pytest.raises(AnnotatorError, match=r"'car': expected a module class id .* got 'road'"):
        LabelMap.from_spec({"car": "road"}, LABELS)
    with pytest.raises(AnnotatorError, match="num_classes=4 but the module's segmentation has num_classes=6"):
        LabelMap.from_spec({"classes": {"car": 1}, "num_classes": 4}, LABELS, 6)
    with pytest.raises(AnnotatorError, match="has 4 labels but the module's segmentation has num_classes=6"):
        load_segmenter(seg_dir, num_classes=6)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotatorError, match=r"bad\.json.*not valid json"):
        LabelMap.from_spec(bad, LABELS)
    assert LabelMap.from_spec({"sky": 2}, LABELS).num_classes == 3  # no K anywhere: max id + 1


def test_model_directories_are_local_and_checked(seg_dir, depth_dir, tmp_path):
    with pytest.raises(AnnotatorError, match=r"segmenter '.*nope': not a directory; expected .*config\.json, "
                                             r"model\.safetensors .*nothing is downloaded"):
        load_segmenter(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((seg_dir / "config.json").read_bytes())
    (partial / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(AnnotatorError, match=r"missing preprocessor_config\.json, model\.safetensors or "
                                             r"model\.safetensors\.index\.json \(pytorch_model\.bin found: pickled"):
        load_segmenter(partial)
    with pytest.raises(AnnotatorError, match=r"architectures \['DPTForDepthEstimation'\]; "
                                             r"expected a \*ForSemanticSegmentation model"):
        load_segmenter(depth_dir)
    # without the architectures hint the depth weights would load into a DPT segmenter with a random head
    unnamed = tmp_path / "unnamed"
    shutil.copytree(depth_dir, unnamed)
    cfg = json.loads((unnamed / "config.json").read_text())
    del cfg["architectures"]
    (unnamed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AnnotatorError, match="cannot be loaded as AutoModelForSemanticSegmentation: the weights"):
        load_segmenter(unnamed)
    # an encoder-only checkpoint: the segmentation head would stay at its random init
    from transformers import SegformerConfig, SegformerModel

    encoder = tmp_path / "encoder"
    SegformerModel(SegformerConfig.from_pretrained(seg_dir)).save_pretrained(encoder)
    shutil.copy(seg_dir / "preprocessor_config.json", encoder)
    cfg = json.loads((encoder / "config.json").read_text())
    del cfg["architectures"]
    (encoder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AnnotatorError, match=r"do not fit SegformerForSemanticSegmentation \(missing_keys: "
                                             r"\['decode_head"):
        load_segmenter(encoder)
    with pytest.raises(AnnotatorError, match="depth kind: expected one of"):
        load_depth_model(depth_dir, kind="disparity")


# ---- depth ----------------------------------------------------------------------------------------------
def test_depth_follows_the_documented_convention(depth_dir):
    images = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    raw = _own_dpt(depth_dir, images).double()
    lo, hi = raw.amin(dim=(1, 2, 3), keepdim=True), raw.amax(dim=(1, 2, 3), keepdim=True)
    assert (hi - lo).min() > 1e-3  # not a flat map
    n = (raw - lo) / (hi - lo)
    model = load_depth_model(depth_dir)
    assert model.kind == "inverse"  # DPT predicts relative inverse depth: d = 1 - n
    d = model.depth(images)
    assert d.shape == (2, 1, 20, 24) and torch.allclose(d.double(), 1 - n, atol=1e-6)
    nearest = raw.flatten(1).argmax(1)  # largest disparity = nearest pixel -> depth 0
    assert d.flatten(1)[torch.arange(2), nearest].abs().max() < 1e-6
    metric = load_depth_model(depth_dir, kind="metric").depth(images)
    assert torch.allclose(metric.double(), n, atol=1e-6)


# ---- mcm data pack --derive -----------------------------------------------------------------------------




def test_pack_derives_seg_and_depth_members(seg_dir, depth_dir, tmp_path):
    from mcm.cli.tool_commands import run_tool_command

    rng = np.random.default_rng(0)
    images = {f"im{i}": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(3)}
    for stem, arr in images.items():
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "images" / f"{stem}.png")
    own_seg = rng.integers(0, 3, (20, 24), dtype=np.uint8)  # im0 has its own seg: kept, not derived
    (tmp_path / "seg").mkdir()
    Image.fromarray(own_seg).save(tmp_path / "seg" / "im0.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"wall": 0, "person": 1, "car": 2, "sky": 2}))
    out = tmp_path / "shards" / "train-%06d.tar"
    assert run_tool_command(["data", "pack", "--images", str(tmp_path / "images"), "--seg", str(tmp_path / "seg"),
                             "--out", str(out), "--derive", "segmentation,depth", "--segmenter", str(seg_dir),
                             "--label-map", str(labels), "--depth-model", str(depth_dir)]) == 0
    samples = read_shard_members(sorted(str(p) for p in out.parent.glob("*.tar")))
    assert sorted(samples) == ["im0", "im1", "im2"]
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images.values()]).float() / 255
    # batched as pack runs them (same-size photos, one call per map): seg for im1, im2; depth for all three
    ids = torch.cat([torch.zeros_like(batch[:1, 0]).long(), load_segmenter(seg_dir, labels).segment(batch[1:])])
    depth = load_depth_model(depth_dir).depth(batch)
    for i, stem in enumerate(images):
        seg = png_array(samples[stem]["seg.png"])
        assert seg.dtype == np.uint8
        np.testing.assert_array_equal(seg, own_seg if stem == "im0" else ids[i].numpy())
        d16 = png_array(samples[stem]["depth.png"])
        assert d16.dtype == np.uint16
        np.testing.assert_array_equal(d16, np.round(depth[i, 0].double().numpy() * 65535).astype(np.uint16))
        meta = json.loads(samples[stem]["json"])
        assert meta["derived"] == (["depth"] if stem == "im0" else ["seg", "depth"])
    # one image per annotator call gives the same maps (depth: batched kernels may round the last bit apart)
    out1 = tmp_path / "shards1" / "train-%06d.tar"
    assert run_tool_command(["data", "pack", "--images", str(tmp_path / "images"), "--seg", str(tmp_path / "seg"),
                             "--out", str(out1), "--derive", "segmentation,depth", "--segmenter", str(seg_dir),
                             "--label-map", str(labels), "--depth-model", str(depth_dir), "--batch-size", "1"]) == 0
    one_by_one = read_shard_members(sorted(str(p) for p in out1.parent.glob("*.tar")))
    for stem in images:
        np.testing.assert_array_equal(png_array(one_by_one[stem]["seg.png"]), png_array(samples[stem]["seg.png"]))
        diff = np.abs(png_array(one_by_one[stem]["depth.png"]).astype(int) - png_array(samples[stem]["depth.png"]))
        assert diff.max() <= 1, diff.max()
    # an "ignore" label map has no meaning in a derived seg.png; a model without --derive is a mistake
    labels.write_text(json.dumps({"sky": "ignore"}))
    args = ["data", "pack", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "x" / "t-%06d.tar")]
    assert run_tool_command(args + ["--derive", "segmentation", "--segmenter", str(seg_dir),
                                    "--label-map", str(labels)]) == 2
    assert run_tool_command(args + ["--depth-model", str(depth_dir)]) == 2
    assert not (tmp_path / "x").exists()


# ---- mcm evaluate --segmenter --depth-model ----------------------------------------------------------------
def _miou(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    """Dataset mIoU by hand; a pixel the judge put in an ignored class (255) is a miss of its target class,
    never skipped (else painting an ignored class where the map asks for a car would go unpunished)."""
    ious = []
    for c in range(k):
        union = np.sum((pred == c) | (target == c))
        if union:
            ious.append(np.sum((pred == c) & (target == c)) / union)
    return float(np.mean(ious))


def test_evaluate_with_local_judges(seg_dir, depth_dir, tiny_pixel_base_dir, tmp_path):
    from datamodules.shapes import write_shapes_shards
    from mcm.cli.tool_commands import build_parser, run_tool_command
    from mcm.evaluation.evaluate import build_pipeline, generate, load_data
    from mcm.evaluation.metrics import depth_alignment
    from mcm.models.frozen_base import FrozenBase
    from mcm.models.modulator import MultimodalConditioningModule
    from mcm.pipelines import save_module

    mods = {"segmentation": {"num_classes": 6}, "depth": {}}
    torch.manual_seed(0)
    module = MultimodalConditioningModule(latent_channels=3, modalities=mods, block_out_channels=(16, 16),
                                          layers_per_block=1, attention_levels=(), norm_num_groups=8)
    with torch.no_grad():
        module.unet.conv_out.weight.normal_(0, 0.05)
    mcm_dir = save_module(module, tmp_path / "mcm", FrozenBase.from_pretrained(tiny_pixel_base_dir))
    write_shapes_shards(tmp_path / "data", train=0, val=4, size=16, shard_size=4, workers=1)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"wall": 0, "person": 1, "car": 3, "sky": "ignore"}))
    data_glob = str(tmp_path / "data" / "val-*.tar")
    argv = ["evaluate", "--mcm", str(mcm_dir), "--data", data_glob, "--n", "4", "--seeds", "0", "--strength", "1",
            "--steps", "2", "--batch-size", "4", "--threads", "1", "--segmenter", str(seg_dir), "--label-map",
            str(labels), "--depth-model", str(depth_dir), "--out", str(tmp_path / "eval")]
    assert run_tool_command(argv) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["judges"] == {"segmentation": str(seg_dir), "depth": str(depth_dir), "features": str(seg_dir)}
    assert report["judge_label_map"] == str(labels)

    # the same samples again (same seeds), judged here directly
    a = build_parser().parse_args(argv)
    pipe = build_pipeline(a.mcm, None, None, "cpu")
    data = load_data(data_glob, mods, 16, 4)
    setting = report["settings"][0]
    assert sorted(setting["modalities"]) == ["depth", "segmentation"]

    class _Quiet:
        def update(self, n: int) -> None:
            pass

    samples = generate(pipe, data, setting, a, _Quiet())[0]
    seg, depth = load_segmenter(seg_dir, labels, num_classes=6), load_depth_model(depth_dir)
    target = data["segmentation"].numpy()
    for images, metrics in ((samples, setting["metrics"]), (data["image"], report["reference"]["metrics"])):
        ids = seg.segment(images).numpy()
        assert 0 < (ids == IGNORE).mean() < 1  # "sky" pixels count as misses of their target class
        assert metrics["seg_miou"] == pytest.approx(_miou(ids, target, 6), abs=1e-6)
        d = depth_alignment(depth.depth(images), data["depth"])
        assert metrics["depth_ssi_rmse"] == pytest.approx(d["ssi_rmse"], abs=1e-6)


# ---- the judges of one evaluation ---------------------------------------------------------------------------
def test_build_judges_defaults_local_models_and_conflicts(seg_dir, depth_dir):
    from mcm.evaluation.judges import BUILTIN_JUDGES, build_judges, load_judge

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    shipped = build_judges()  # no local model: the shapes32 judges, features from the segmentation judge
    assert shipped.names() == {"segmentation": str(BUILTIN_JUDGES["shapes32-segmentation"]),
                               "depth": str(BUILTIN_JUDGES["shapes32-depth"]),
                               "features": str(BUILTIN_JUDGES["shapes32-segmentation"])}
    assert shipped["features"] is shipped.segmentation and dict(shipped)["depth"] is shipped.depth
    assert torch.equal(shipped.segment(images), load_judge("shapes32-segmentation").predict(images))
    local = build_judges(segmenter=seg_dir, depth_model=depth_dir)
    assert local.segmentation.num_classes == 4 and local.features is local.segmentation
    assert torch.equal(local.segment(images), _own_segformer(seg_dir, images).argmax(1))
    assert torch.equal(local.estimate_depth(images), load_depth_model(depth_dir).depth(images))
    assert local.features.has_features and local.features.features(images).shape == (2, 16)
    # a transformers directory is also a load_judge spec (task from its architectures)
    assert torch.equal(load_judge(seg_dir).predict(images), local.segment(images))
    assert load_judge(depth_dir).task == "depth"
    assert build_judges(base_name="sd15").names() == dict.fromkeys(("segmentation", "depth", "features"))
    assert build_judges(seg_judge="none").features is None
    with pytest.raises(ValueError, match="give one judge per task"):
        build_judges(segmenter=seg_dir, seg_judge="shapes32-segmentation")
    with pytest.raises(ValueError, match="give segmenter= too"):
        build_judges(label_map="labels.json")
