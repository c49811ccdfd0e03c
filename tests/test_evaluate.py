"""``mcm evaluate`` end to end on a tiny config: every metric key, deterministic JSON, report files."""
from __future__ import annotations

import importlib
import json
from unittest import mock

import pytest
import torch

from mcm.evaluation.evaluate import METRIC_KEYS
from mcm.cli.tool_commands import run_tool_command

MODALITIES = {"segmentation": {"num_classes": 6}, "sketch": {}, "depth": {}, "partial_mask": {"num_classes": 6}}


@pytest.fixture(scope="module")
def tiny_setup(tiny_pixel_base_dir, tmp_path_factory):
    """Tiny random pixel base + a fresh MCM over all four built-ins (output layer nudged off zero) + 8 val shapes."""
    from datamodules.shapes import write_shapes_shards
    from mcm.models.frozen_base import FrozenBase
    from mcm.models.modulator import MultimodalConditioningModule
    from mcm.pipelines import save_module

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    module = MultimodalConditioningModule(latent_channels=3, modalities=MODALITIES, block_out_channels=(16, 16),
                                          layers_per_block=1, attention_levels=(), norm_num_groups=8)
    with torch.no_grad():  # a zero output layer would make the MCM an exact no-op
        module.unet.conv_out.weight.normal_(0, 0.05)
    mcm_dir = save_module(module, root / "mcm", FrozenBase.from_pretrained(tiny_pixel_base_dir))
    write_shapes_shards(root / "data", train=0, val=8, size=16, shard_size=8, workers=1)
    return mcm_dir, str(root / "data" / "val-*.tar")


#: the tiny base here is not shapes32, so no judge is a default; its images are shapes, which these judge
SHAPES_JUDGES = ("--seg-judge", "shapes32-segmentation", "--depth-judge", "shapes32-depth")


def _evaluate(out, *args: str) -> dict:
    judges = () if "--seg-judge" in args else SHAPES_JUDGES
    assert run_tool_command(["evaluate", *args, *judges, "--n", "8", "--steps", "2", "--batch-size", "4",
                             "--threads", "1", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_end_to_end_and_deterministic(tiny_setup, tmp_path):
    mcm_dir, data = tiny_setup
    args = ("--mcm", str(mcm_dir), "--data", data, "--seeds", "0", "1", "--strength", "0.5", "1")
    report = _evaluate(tmp_path / "a", *args)
    assert [(sorted(s["modalities"]), s["strength"]) for s in report["settings"]] == [
        (sorted(MODALITIES), 0.5), (sorted(MODALITIES), 1.0)]
    for s in report["settings"]:
        assert s["mcm"] == [str(mcm_dir)] and s["weights"] == [1.0]
        assert set(s["metrics"]) == set(METRIC_KEYS)
        for key in METRIC_KEYS:
            if key in ("fid_inception", "clip_score"):
                assert s["metrics"][key] is None  # no Inception weights, no CLIP checkpoint given
            else:
                assert isinstance(s["metrics"][key], float), key
    again = _evaluate(tmp_path / "b", *args)
    assert again == report  # same seeds -> identical numbers
    for name in ("metrics.md", "alignment_vs_strength.png", "quality_vs_alignment.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert len(list((tmp_path / "a" / "grids").glob("*.png"))) == 2
    assert "| MCM | modalities | strength |" in (tmp_path / "a" / "metrics.md").read_text()


def test_evaluate_base_alone_per_modality_with_clip_and_curve(tiny_setup, tiny_pixel_base_dir, tmp_path):
    import open_clip
    from test_metrics import TINY_CLIP

    _, data = tiny_setup
    config = tmp_path / "mcm-eval-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("mcm-eval-tiny-clip").state_dict(), tmp_path / "clip.pt")
    report = _evaluate(tmp_path / "base", "--base", str(tiny_pixel_base_dir), "--data", data, "--seeds", "3",
                       "--modalities", "segmentation", "sketch", "--per-modality", "--clip-arch", "mcm-eval-tiny-clip",
                       "--clip-checkpoint", str(tmp_path / "clip.pt"), "--clip-config", str(config))
    got = [(s["mcm"], s["modalities"], s["strength"]) for s in report["settings"]]
    assert got == [([], ["segmentation"], 0.0), ([], ["sketch"], 0.0), ([], ["segmentation", "sketch"], 0.0)]
    first, second = report["settings"][0]["metrics"], report["settings"][1]["metrics"]
    assert first["seg_miou"] is not None and first["sketch_f1"] is None and first["depth_delta1"] is None
    assert second["sketch_f1"] is not None and second["seg_miou"] is None
    assert first["diversity"] is None  # one seed
    assert isinstance(first["clip_score"], float) and first["fid_judge"] == second["fid_judge"]  # same samples
    # the limited-data plot from earlier results
    curve = tmp_path / "curve"
    assert run_tool_command(["evaluate", "--curve", f"250={tmp_path / 'base' / 'metrics.json'}",
                             f"500={tmp_path / 'base' / 'metrics.json'}", "--out", str(curve)]) == 0
    assert (curve / "alignment_vs_train_images.png").stat().st_size > 0
    table = (curve / "alignment_vs_train_images.md").read_text().splitlines()
    assert table[0].startswith("| training images |") and table[2].startswith("| 250 |")


def test_evaluate_composes_modules(tiny_setup, tiny_pixel_base_dir, tmp_path):
    """Two separately trained modules (segmentation-only, sketch-only) composed with weights (MCDM)."""
    from mcm.models.frozen_base import FrozenBase
    from mcm.models.modulator import MultimodalConditioningModule
    from mcm.pipelines import save_module

    _, data = tiny_setup
    base = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    dirs = []
    for name in ("segmentation", "sketch"):
        m = MultimodalConditioningModule(latent_channels=3, modalities={name: MODALITIES[name]},
                                         block_out_channels=(16, 16), layers_per_block=1, attention_levels=(),
                                         norm_num_groups=8)
        dirs.append(str(save_module(m, tmp_path / name, base)))
    report = _evaluate(tmp_path / "out", "--mcm", *dirs, "--weights", "1", "0.5", "--data", data, "--seeds", "0",
                       "--per-modality")
    got = [(s["modalities"], s["weights"]) for s in report["settings"]]
    assert got == [(["segmentation"], [1.0, 0.5]), (["sketch"], [1.0, 0.5]), (["segmentation", "sketch"], [1.0, 0.5])]
    assert report["reference"]["modalities"] == ["segmentation", "sketch"]
    assert report["reference"]["metrics"]["sketch_f1"] == 1.0  # real images vs their own derived sketches
    assert "*real held-out images*" in (tmp_path / "out" / "metrics.md").read_text()


def test_evaluate_rejects_unknown_modalities(tiny_setup, tmp_path):
    mcm_dir, data = tiny_setup
    with pytest.raises(ValueError, match="no --modules module was trained on them"):
        _evaluate(tmp_path / "x", "--mcm", str(mcm_dir), "--data", data, "--modalities", "thermal")


# ---- judges: the shipped ones and pluggable ones --------------------------------------------------------
def saturation_judge(images: torch.Tensor) -> torch.Tensor:
    """A user judge as a plain function: saturated pixels are 'objects' (class 1), the rest background."""
    sat = images.amax(1) - images.amin(1)
    return (sat > 0.3).long()


def test_shipped_judges_read_shapes():
    from datamodules.shapes import make_sample
    from mcm.evaluation.judges import list_judges, load_judge
    from mcm.evaluation.metrics import depth_alignment, segmentation_alignment

    assert list_judges() == ["shapes32-depth", "shapes32-segmentation"]
    samples = [make_sample(0, i, 32, "test") for i in range(16)]
    img = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples]).float() / 255
    seg = torch.stack([torch.from_numpy(s.seg).long() for s in samples])
    depth = torch.stack([torch.from_numpy(s.depth.astype("float32") / 65535) for s in samples])[:, None]
    judge = load_judge("shapes32-segmentation")
    assert judge.task == "segmentation" and judge.num_classes == 6 and judge.num_features == 96
    assert segmentation_alignment(judge.predict(img), seg, 6)["miou"] > 0.85
    assert depth_alignment(load_judge("shapes32-depth").predict(img), depth)["delta1"] > 0.7
    with pytest.raises(ValueError, match="judges segmentation, but depth"):
        load_judge("shapes32-segmentation", task="depth")
    with pytest.raises(ValueError, match="Did you mean 'shapes32-depth'"):
        load_judge("shapes32-dept")


def test_pluggable_judges(tmp_path):
    from safetensors.torch import save_file

    from mcm.evaluation.judges import load_judge
    from mcm.evaluation.judges.networks import JudgeUNet

    img = torch.rand(2, 3, 16, 16)
    fn = load_judge("test_evaluate:saturation_judge", task="segmentation")
    assert fn.predict(img).shape == (2, 16, 16) and not fn.has_features
    with pytest.raises(ValueError, match="pass task="):
        load_judge("test_evaluate:saturation_judge")
    # any nn.Module from a config: class path + init args + safetensors weights
    torch.manual_seed(0)
    net = JudgeUNet(task="depth", widths=(8, 8))
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "class_path": "mcm.evaluation.judges.networks:JudgeUNet", "init_args": {"task": "depth", "widths": [8, 8]},
        "task": "depth"}))
    judge = load_judge(tmp_path)
    assert judge.task == "depth" and torch.equal(judge.predict(img), net.eval().predict(img))


@pytest.mark.parametrize("class_path", ["subprocess:call", "subprocess.call", "os:system", "builtins:eval",
                                        "mcm.evaluation.judges.networks:JudgeUNetX", ["subprocess", "call"]])
def test_a_judge_directory_naming_another_class_is_refused_before_import(tmp_path, class_path):
    """Regression (issue: correctness and security): a judge directory's config.json ``class_path`` was imported
    and called whatever it named (``subprocess:call`` with ``args`` ran a program, reached by ``mcm evaluate
    --seg-judge DIR`` and the alignment callback).  Only the shipped judge networks are allowed; nothing is
    imported or run, and the error names the class and the allowed ones."""
    from mcm.evaluation.judges import load_judge

    marker = tmp_path / "pwned"
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text(json.dumps({
        "class_path": class_path, "init_args": {"args": ["touch", str(marker)]}, "task": "segmentation"}))
    real_import = importlib.import_module
    with mock.patch("importlib.import_module", side_effect=lambda name, *a: (
            pytest.fail(f"imported {name}") if name.split(".")[0] in ("subprocess", "os", "builtins") else
            real_import(name, *a))):
        with pytest.raises(ValueError, match=r"is not an allowed judge class; expected one of "
                                             r"\['mcm.evaluation.judges.networks:JudgeUNet'\]"):
            load_judge(tmp_path / "judge")
    assert not marker.exists()


def test_real_images_score_as_perfectly_aligned(tmp_path):
    """Guards the plumbing (maps, images and judges aligned; no flip or offset): the held-out images
    themselves, scored as if generated, must align with their own maps and have FID ~0 to themselves."""
    import argparse

    from datamodules.shapes import write_shapes_shards
    from mcm.evaluation.evaluate import load_data, score
    from mcm.evaluation.judges import load_judge

    write_shapes_shards(tmp_path, train=0, val=8, size=32, workers=1)
    specs = {"segmentation": {"num_classes": 6}, "sketch": {}, "depth": {}, "partial_mask": {"num_classes": 6}}
    data = load_data(str(tmp_path / "val-000000.tar"), specs, 32, 8)
    seg = load_judge("shapes32-segmentation")
    judges = {"segmentation": seg, "depth": load_judge("shapes32-depth"), "features": seg}
    a = argparse.Namespace(sketch_tolerance=1)
    m = score(data["image"][None], data, {"modalities": list(specs), "strength": 1.0}, specs, judges, {}, a)
    assert m["seg_miou"] > 0.85 and m["seg_pixel_acc"] > 0.97
    # 8 images: a class hidden everywhere but predicted on a few known pixels scores IoU 0, hence the lower bar
    assert m["partial_pixel_acc"] > 0.97 and m["partial_miou"] > 0.6
    assert m["sketch_f1"] == 1.0  # the sketch was derived from these very images by the same detector
    assert m["depth_delta1"] > 0.7
    assert abs(m["fid_judge"]) < 1e-3 and m["diversity"] is None and m["clip_score"] is None


# ---- does a module use its maps (python -m mcm.evaluation.condition_use) -------------------------------------
def test_condition_use_compares_own_maps_with_another_samples(tiny_setup, tiny_pixel_base_dir, tmp_path, capsys):
    """A zero-output MCM is the base exactly (own = other = base); a map-dependent one differs between its own
    and another sample's maps, but not when every sample has the same map; the CLI writes the same rows."""
    from mcm.evaluation import evaluate as E
    from mcm.evaluation.condition_use import band_losses, main
    from mcm.models.frozen_base import FrozenBase
    from mcm.models.modulator import MultimodalConditioningModule

    mcm_dir, data_glob = tiny_setup
    base = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    module = MultimodalConditioningModule.from_pretrained(mcm_dir)
    data = E.load_data(data_glob, {"sketch": {}}, 16, 8)
    bands = [(0, 500), (500, 1000)]
    rows = band_losses(base, module, data, ["sketch"], bands, seed=3, batch_size=4)
    assert [r["band"] for r in rows] == [[0, 500], [500, 1000]]
    assert all(r["own"] != r["other"] for r in rows)
    same = {**data, "sketch": data["sketch"][:1].expand_as(data["sketch"]).clone()}
    rows_same = band_losses(base, module, same, ["sketch"], bands, seed=3, batch_size=4)
    assert all(r["own"] == r["other"] for r in rows_same)
    assert [r["base"] for r in rows_same] == [r["base"] for r in rows]  # the same x_t for the same seed
    zero = MultimodalConditioningModule.from_pretrained(mcm_dir)
    with torch.no_grad():
        zero.unet.conv_out.weight.zero_()
        zero.unet.conv_out.bias.zero_()
    rows_zero = band_losses(base, zero, data, ["sketch"], bands, seed=3, batch_size=4)
    assert all(r["own"] == r["other"] == r["base"] for r in rows_zero)
    assert [r["base"] for r in rows_zero] == [r["base"] for r in rows]
    out = tmp_path / "use.json"
    assert main(["--mcm", str(mcm_dir), "--data", data_glob, "--n", "8", "--modalities", "sketch", "--bands", "2",
                 "--seed", "3", "--json", str(out)]) == 0
    assert "| 500-1000 |" in capsys.readouterr().out
    written = json.loads(out.read_text())["rows"]
    assert [r["band"] for r in written] == [[0, 500], [500, 1000]] and all(r["base"] > 0 for r in written)
