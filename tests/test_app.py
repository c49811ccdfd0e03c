"""``mcm app`` without a browser: canvases <-> maps, uploads, held-out examples, scores, the Python call, sampling.

Value checks on the plain functions of ``mcm.cli.app_maps`` / ``mcm.cli.app_session`` (the Gradio
page is driven in a real browser by ``tests/test_app_browser.py``).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import modalities
from mcm.cli import app_maps as M
from mcm.cli import app_session as S
from mcm.pipelines import MCMPipelineOutput

SIZE, SCALE = (32, 32), 8
SQUARE = 2


def _plugin(name: str):
    return modalities.get(name, num_classes=6) if name in ("segmentation", "partial_mask") else modalities.get(name)


@pytest.fixture(scope="module")
def specs():
    return {n: M.canvas_spec(n, _plugin(n)) for n in M.MODALITY_ORDER}


@pytest.fixture(scope="module")
def session():
    return S.Session(["shapes32"])


def _png(arr: np.ndarray, path, mode: str | None = None):
    Image.fromarray(arr, mode=mode).save(path)
    return path


# ---- canvases -------------------------------------------------------------------------------------------
def test_palette_is_the_plugins_visualize_colours_with_class_names(specs):
    from datamodules.shapes import CLASS_NAMES
    from modalities.segmentation import PALETTE

    seg = specs["segmentation"]
    assert seg.kind == "labels" and seg.values.tolist() == [0, 1, 2, 3, 4, 5] and seg.blank == 0
    assert seg.colors.tolist() == [[int(c * 255 + 0.5) for c in rgb] for rgb in PALETTE]
    assert [n for n, _ in seg.legend] == list(CLASS_NAMES)
    assert seg.legend[SQUARE][1] == "#26bf40"
    part = specs["partial_mask"]  # the classes, then both checkerboard greys of "unknown" read as 255
    assert part.values.tolist() == [0, 1, 2, 3, 4, 5, 255, 255] and part.blank == 255
    assert part.colors[6:].tolist() == [[204, 204, 204], [255, 255, 255]]
    assert part.legend[-1] == ("unknown", "#ffffff")
    assert specs["sketch"].kind == "continuous" and specs["sketch"].binary and specs["sketch"].blank == 0
    assert specs["depth"].kind == "continuous" and not specs["depth"].binary and specs["depth"].blank == 1.0


def test_a_rectangle_in_the_squares_colour_becomes_label_2_in_exactly_that_rectangle(specs):
    spec = specs["segmentation"]
    canvas = M.blank_canvas(spec, SIZE, SCALE)  # (256, 256, 3), the background's dark grey
    assert canvas.shape == (256, 256, 3) and (canvas == spec.colors[0]).all()
    canvas[40:120, 64:200] = spec.colors[SQUARE]  # rows 5..14, columns 8..24 of the 32x32 map
    labels = M.canvas_to_raw(spec, canvas, SIZE)
    expected = torch.zeros(1, 32, 32, dtype=torch.long)
    expected[:, 5:15, 8:25] = SQUARE
    assert labels.dtype == torch.long and torch.equal(labels, expected)


def test_soft_brush_edges_and_transparent_pixels_read_by_majority_vote(specs):
    spec = specs["segmentation"]
    canvas = np.zeros((256, 256, 4), np.uint8)  # fully transparent: reads as background
    green, grey = spec.colors[SQUARE].astype(float), spec.colors[0].astype(float)
    canvas[42:118, 42:118, :3] = ((green + grey) / 2).astype(np.uint8)  # a 1-pixel anti-aliased ring ...
    canvas[42:118, 42:118, 3] = 255
    canvas[43:117, 43:117, :3] = spec.colors[SQUARE]  # ... around rows/columns 43..116
    labels = M.canvas_to_raw(spec, canvas, SIZE)[0]
    # output pixel i covers canvas rows 8i..8i+7: 43..47 (5 of 8) in cell 5, 112..116 (5 of 8) in cell 14, so
    # border cells are 40 of 64 pixels square (kept) and the 4 corner cells 25 of 64 (background)
    expected = torch.zeros(32, 32, dtype=torch.long)
    expected[5:15, 5:15] = SQUARE
    expected[5, 5] = expected[5, 14] = expected[14, 5] = expected[14, 14] = 0
    assert torch.equal(labels, expected)


def test_partial_mask_canvas_unknown_everywhere_not_drawn(specs):
    spec = specs["partial_mask"]
    canvas = M.blank_canvas(spec, SIZE, SCALE)
    canvas[0:64, 0:64] = spec.colors[1]  # a circle-class patch in the corner
    raw = M.canvas_to_raw(spec, canvas, SIZE)[0]
    assert (raw[:8, :8] == 1).all() and (raw[8:] == 255).all() and (raw[:, 8:] == 255).all()
    # the checkerboard that visualize draws for unknown pixels reads back as unknown
    back = M.canvas_to_raw(spec, M.raw_to_canvas(spec, raw[None], SCALE), SIZE)
    assert torch.equal(back[0], raw)


def test_a_sketch_stroke_becomes_a_one_pixel_line(specs):
    spec = specs["sketch"]
    canvas = M.blank_canvas(spec, SIZE, SCALE)
    assert (canvas == 255).all()  # white paper = no strokes
    canvas[80:88, 40:200] = 0  # a black 8-pixel stroke: row 10, columns 5..24
    raw = M.canvas_to_raw(spec, canvas, SIZE)
    expected = torch.zeros(1, 1, 32, 32)
    expected[..., 10, 5:25] = 1
    assert torch.equal(raw, expected)


def test_depth_levels_read_back_as_depth(specs):
    spec = specs["depth"]
    canvas = M.blank_canvas(spec, SIZE, SCALE)  # farthest everywhere
    levels = dict(spec.legend)
    near = np.array([int(levels["0"][i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
    mid = np.array([int(levels["0.5"][i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
    canvas[:, :128] = near
    canvas[:128, 128:] = mid
    raw = M.canvas_to_raw(spec, canvas, SIZE)[0, 0]
    assert torch.allclose(raw[:, :16], torch.zeros(32, 16), atol=1 / 255)
    assert torch.allclose(raw[:16, 16:], torch.full((16, 16), 0.5), atol=1 / 255)
    assert torch.allclose(raw[16:, 16:], torch.ones(16, 16), atol=1 / 255)


def test_held_out_examples_round_trip_through_their_canvases(specs):
    plugins = {n: s.plugin for n, s in specs.items()}
    maps, caption, image = M.HeldOut(plugins, SIZE)(3)
    assert caption and image.shape == (1, 3, 32, 32)
    for name, raw in maps.items():
        back = M.canvas_to_raw(specs[name], M.raw_to_canvas(specs[name], raw, SCALE), SIZE)
        if name == "depth":
            assert torch.allclose(back, raw, atol=1 / 255)  # 8-bit colours
        else:
            assert torch.equal(back, raw), name


def test_held_out_examples_are_the_generators_test_split(specs):
    from datamodules.shapes import make_sample

    plugins = {n: s.plugin for n, s in specs.items()}
    maps, caption, _ = M.HeldOut(plugins, SIZE)(5)
    ref = make_sample(M.EXAMPLE_SEED, 5, 32, split="test")
    assert caption == ref.caption
    assert torch.equal(maps["segmentation"][0], torch.from_numpy(ref.seg.astype(np.int64)))
    assert torch.allclose(maps["depth"][0, 0], torch.from_numpy(ref.depth / 65535.0).float(), atol=1e-6)
    part = maps["partial_mask"][0]
    known = part != 255
    assert 0 < known.sum() < 32 * 32 and torch.equal(part[known], maps["segmentation"][0][known])
    again, _, _ = M.HeldOut(plugins, SIZE)(5)
    assert all(torch.equal(again[n], maps[n]) for n in maps)  # deterministic


def test_is_blank(specs):
    spec = specs["segmentation"]
    canvas = M.blank_canvas(spec, SIZE, SCALE)
    assert M.is_blank(spec, canvas) and M.is_blank(spec, None)
    assert M.is_blank(spec, np.zeros((256, 256, 4), np.uint8))  # transparent
    canvas[3, 3] = spec.colors[1]
    assert not M.is_blank(spec, canvas)


# ---- uploads and the region brush -----------------------------------------------------------------------
def test_an_uploaded_map_of_another_size_is_resized_and_the_note_names_the_modality(specs, tmp_path):
    ids = np.zeros((64, 64), np.uint8)
    ids[16:48, 8:40] = SQUARE
    raw, note = M.read_map_file(specs["segmentation"], _png(ids, tmp_path / "seg.png"), SIZE)
    expected = torch.zeros(1, 32, 32, dtype=torch.long)
    expected[:, 8:24, 4:20] = SQUARE
    assert torch.equal(raw, expected)
    assert "modality 'segmentation'" in note and "64x64" in note and "resized to 32x32" in note
    same, note = M.read_map_file(specs["segmentation"], _png(ids[::2, ::2].copy(), tmp_path / "s32.png"), SIZE)
    assert torch.equal(same, expected) and note is None


def test_an_uploaded_map_of_another_aspect_ratio_is_refused_naming_the_modality(specs, tmp_path):
    with pytest.raises(M.AppError, match=r"modality 'depth': the map is 64x32 .* output is 32x32"):
        M.read_map_file(specs["depth"], _png(np.zeros((32, 64), np.uint8), tmp_path / "d.png"), SIZE)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(M.AppError, match="modality 'sketch'.*not a readable image"):
        M.read_map_file(specs["sketch"], tmp_path / "junk.png", SIZE)


def test_uploaded_maps_read_as_the_shards_store_them(specs, tmp_path):
    depth = np.full((32, 32), 65535, np.uint16)
    depth[:, :16] = 13107  # 0.2
    raw, _ = M.read_map_file(specs["depth"], _png(depth, tmp_path / "depth.png"), SIZE)
    assert torch.allclose(raw[0, 0, :, :16], torch.full((32, 16), 0.2)) and (raw[0, 0, :, 16:] == 1).all()
    paper = np.full((32, 32), 255, np.uint8)
    paper[10, 4:20] = 0  # dark strokes on white paper, as scanned
    raw, _ = M.read_map_file(specs["sketch"], _png(paper, tmp_path / "sketch.png"), SIZE)
    assert raw.sum() == 16 and (raw[0, 0, 10, 4:20] == 1).all()
    colour = M.raw_to_canvas(specs["segmentation"], torch.full((1, 32, 32), 3), 1)  # a colour-coded map
    raw, note = M.read_map_file(specs["segmentation"], _png(colour, tmp_path / "colour.png"), SIZE)
    assert (raw == 3).all() and note is None


def test_region_mask(tmp_path):
    black = np.zeros((256, 256, 3), np.uint8)
    assert M.region_mask(black, SIZE) is None and M.region_mask(None, SIZE) is None
    black[0:128, 64:256] = 255
    m = M.region_mask(black, SIZE)
    assert m.shape == (32, 32) and m.dtype == torch.float32
    assert (m[:16, 8:] == 1).all() and m.sum() == 16 * 24


# ---- requests, scores, the Python call ------------------------------------------------------------------
def _request(**kw):
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 5:15, 8:25] = SQUARE
    return S.Request(**{"maps": {"segmentation": labels}, "modules": [0], "strengths": [1.5], **kw})


@pytest.mark.parametrize("kw, match", [
    ({"modules": []}, "tick at least one module"),
    ({"window": (0.5, 0.5)}, "modulation window"),
    ({"window": (0.2, 1.5)}, "modulation window"),
    ({"steps": 0}, "steps"),
    ({"num_images": 0}, "number of images"),
    ({"strengths": [1.0, 1.0]}, "strength: 2 values for 1 modules"),
])
def test_requests_the_pipeline_would_refuse_are_refused_in_words(kw, match):
    with pytest.raises(M.AppError, match=match):
        S.check_request(_request(**kw), 1)


def test_scores_per_sample_with_the_projects_metrics():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 8:24, 8:24] = SQUARE
    half = labels.clone()
    half[:, :, 16:] = 0  # half of the object found

    class Judge:  # predicts the map for image 0, half of it for image 1, nothing for image 2
        def predict(self, x):
            return torch.cat([labels, half, torch.zeros_like(labels)])[: x.shape[0]]

    seg = _plugin("segmentation")
    rows = S.score_samples({"MCM": torch.zeros(3, 3, 32, 32)}, {"segmentation": labels}, {"segmentation": seg},
                           {"segmentation": Judge()}, [7, 8, 9])
    assert [r["seed"] for r in rows] == [7, 8, 9]
    assert [r["object IoU (MCM)"] for r in rows] == [1.0, 0.5, 0.0]
    assert rows[0]["seg mIoU (MCM)"] == 1.0
    assert rows[2]["seg mIoU (MCM)"] == round((1 - 256 / 1024) / 2, 3)  # background IoU 0.75, square 0


def _fake_session(models, weights, text=True):
    mod = SimpleNamespace(plugins={"segmentation": None, "sketch": None}, modality_names=["segmentation", "sketch"])
    seg_only = SimpleNamespace(plugins={"segmentation": None}, modality_names=["segmentation"])
    mods = [mod, seg_only][: len(models)]
    return SimpleNamespace(models=models, modules=mods, pipe=SimpleNamespace(weights=weights), base_name="shapes32",
                           is_text_conditional=text)


def test_the_python_call_of_one_module():
    req = _request(prompt="a green square", num_images=2, steps=10, seed=5, scheduler="DPM-Solver++ (2M)",
                   window=(0.2, 1.0))
    code = S.python_call(_fake_session(["shapes32"], [1.0]), req)
    assert code.splitlines()[1:] == [
        "import numpy as np",
        "import torch",
        "from diffusers import DPMSolverMultistepScheduler",
        "",
        "from mcm import MCMPipeline",
        "",
        "pipe = MCMPipeline.from_pretrained('shapes32', modules=['shapes32'])",
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
        'maps = np.load("conditions.npz")',
        "conditions = {",
        '    "segmentation": torch.from_numpy(maps["segmentation"]),  # (2, 32, 32)',
        "}",
        "settings = dict(prompt='a green square', num_inference_steps=10, guidance_scale=1.0, seeds=[5, 6], "
        'output_type="pt")',
        "images = pipe(conditions=conditions, conditioning_scale=1.5, control_guidance_start=0.0, "
        "control_guidance_end=0.8, **settings).images"
        "  # base + modules: (2, 3, H, W) in [0, 1]",
        "base = pipe(conditions={}, num_images=2, **settings).images  # the base alone, same seeds",
    ]


def test_the_python_call_of_a_composition_with_a_region(tmp_path):
    a, b = str(tmp_path / "seg_mcm"), str(tmp_path / "sketch_mcm")
    req = _request(modules=[0, 1], strengths=[0.8, 1.2], region=torch.ones(32, 32), negative_prompt="blurry")
    req.maps["sketch"] = torch.zeros(1, 1, 32, 32)
    code = S.python_call(_fake_session([a, b], [1.0, 0.5]), req)
    assert f"pipe = MCMPipeline.from_pretrained('shapes32', modules=[{a!r}, {b!r}], weights=[1.0, 0.5])" in code
    assert 'region = torch.from_numpy(maps["region"])' in code
    assert "conditioning_scale=[0.8 * region, 1.2 * region]" in code and "negative_prompt='blurry'" in code
    # one conditions dict per module, each with the modalities it knows
    assert code.count('"segmentation": torch.from_numpy') == 2 and code.count('"sketch": torch.from_numpy') == 1
    compile(code, "reproduce.py", "exec")


# ---- the pipeline behind the page ------------------------------------------------------------------------
def test_a_drawn_rectangle_is_where_the_judge_finds_the_object(session, specs):
    canvas = M.blank_canvas(specs["segmentation"], SIZE, SCALE)
    canvas[48:176, 64:192] = specs["segmentation"].colors[SQUARE]
    maps = {"segmentation": M.canvas_to_raw(specs["segmentation"], canvas, SIZE)}
    req = S.Request(maps=maps, modules=[0], strengths=[1.5], num_images=3, steps=15, seed=0)
    result = session.generate(req)
    assert result.mcm.shape == result.base.shape == (3, 3, 32, 32)
    assert 0 <= result.mcm.min() and result.mcm.max() <= 1
    assert list(result.conditions) == ["segmentation"] and result.conditions["segmentation"].shape == (1, 3, 32, 32)
    mcm = np.mean([r["object IoU (MCM)"] for r in result.scores])
    base = np.mean([r["object IoU (base)"] for r in result.scores])
    assert mcm > 0.6 and mcm > base + 0.3, result.scores


def test_the_downloaded_script_reproduces_the_images(session, tmp_path, monkeypatch):
    plugins = session.plugins
    maps, caption, _ = M.HeldOut(plugins, session.size)(0)
    maps = {k: maps[k] for k in ("segmentation", "sketch")}
    req = S.Request(maps=maps, modules=[0], strengths=[1.2], prompt=caption, num_images=2, steps=8, seed=3,
                    scheduler="Euler", window=(0.1, 0.9))
    result = session.generate(req)
    files = S.save_result(result, tmp_path / "run")
    for name in ("mcm_images.png", "base_images.png", "mcm_0.png", "reproduce.py", "conditions.npz", "scores.json",
                 "condition_segmentation.png", "mcm_app_run.zip"):
        assert files[name].is_file(), name
    assert Image.open(files["mcm_images.png"]).size == (64, 32)  # a row of two native-size samples
    monkeypatch.chdir(tmp_path / "run")
    scope: dict = {}
    exec(compile(files["reproduce.py"].read_text(), "reproduce.py", "exec"), scope)
    assert torch.allclose(scope["images"], result.mcm, atol=1e-5)
    assert torch.allclose(scope["base"], result.base, atol=1e-5)
    assert not torch.allclose(result.mcm, result.base, atol=1e-2)


class _SpyPipe:
    """Stands in for the pipeline: records the calls, returns grey images, or raises like the pipeline."""

    def __init__(self, real, error: Exception | None = None):
        self.real, self.error, self.calls = real, error, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __setattr__(self, name, value):
        if name in ("real", "error", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.real, name, value)

    def __call__(self, conditions=None, **kw):
        self.calls.append({"conditions": conditions, **kw})
        if self.error is not None and conditions:
            raise self.error
        return MCMPipelineOutput(images=torch.full((len(kw["seeds"]), 3, 32, 32), 0.5))


def test_the_region_brush_passes_the_strength_as_a_map(session, monkeypatch):
    spy = _SpyPipe(session.pipe)
    monkeypatch.setattr(session, "pipe", spy)
    region = torch.zeros(32, 32)
    region[:, :16] = 1
    result = session.generate(_request(region=region, num_images=2))
    strength = next(c for c in spy.calls if c["conditions"])["conditioning_scale"]
    assert isinstance(strength, torch.Tensor) and torch.equal(strength, 1.5 * region)
    assert "conditioning_scale=1.5 * region" in result.code and np.array_equal(result.arrays["region"], region.numpy())


def test_the_base_alone_is_sampled_once_per_sampler_setting(session, monkeypatch):
    spy = _SpyPipe(session.pipe)
    monkeypatch.setattr(session, "pipe", spy)
    monkeypatch.setattr(session, "_base_cache", {})
    first = session.generate(_request(num_images=2, seed=11))
    again = session.generate(_request(num_images=2, seed=11, strengths=[0.5]))  # another strength: same base
    other = session.generate(_request(num_images=2, seed=12))
    assert [bool(c["conditions"]) for c in spy.calls] == [False, True, True, False, True]
    assert again.base is first.base and other.base is not first.base


def test_a_pipeline_error_reaches_the_page_as_its_message(session, monkeypatch):
    msg = "strength: expected a map of 32x32 (the output size), got (16, 16)"
    monkeypatch.setattr(session, "pipe", _SpyPipe(session.pipe, ValueError(msg)))
    with pytest.raises(ValueError, match=r"strength: expected a map of 32x32"):
        session.generate(_request(region=torch.ones(32, 32)))
    with pytest.raises(M.AppError, match="tick at least one condition"):
        session.generate(_request(maps={}))


def test_a_base_the_modules_were_not_trained_on_is_refused(session, tiny_pixel_base_dir):
    from mcm.models.frozen_base import BaseMismatchError

    with pytest.raises(BaseMismatchError, match="was trained on base 'shapes32'"):
        S.Session(["shapes32"], base=str(tiny_pixel_base_dir))
    before = session.pipe
    with pytest.raises(BaseMismatchError):
        session.switch_base(str(tiny_pixel_base_dir))
    assert session.pipe is before and session.base_name == "shapes32"  # the page keeps working


def test_every_scheduler_of_the_dropdown_loads(session):
    for label, cls in S.SCHEDULERS.items():
        assert type(session.scheduler(label)).__name__ == cls
    with pytest.raises(M.AppError, match="scheduler"):
        session.scheduler("nope")


# ---- the command and the page ------------------------------------------------------------------------------
def test_mcm_app_command_defaults_serve_this_machine_only():
    from mcm.cli.tool_commands import build_parser

    a = build_parser().parse_args(["app"])
    assert (a.host, a.port, a.share, a.model, a.base) == ("127.0.0.1", 7860, False, None, None)
    a = build_parser().parse_args(["app", "--model", "x", "y", "--weights", "1", "0.5", "--port", "9000"])
    assert a.model == ["x", "y"] and a.weights == [1.0, 0.5] and a.port == 9000


def test_the_page_has_a_canvas_per_modality_in_the_palette_colours(session, specs):
    pytest.importorskip("gradio")
    from mcm.cli.app import build_app

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(session)
    comps = {c.get("props", {}).get("elem_id"): c for c in demo.get_config_file()["components"]}
    for n in ("segmentation", "sketch", "depth", "partial_mask"):
        assert f"canvas-{n}" in comps and f"upload-{n}" in comps
    assert {"generate", "load-example", "mcm-images", "base-images", "conditions", "downloads", "code",
            "scores", "region", "prompt"} <= set(comps)
    brush = comps["canvas-segmentation"]["props"]["brush"]
    assert brush["colors"] == [c for _, c in specs["segmentation"].legend] and brush["color_mode"] == "fixed"


def test_held_out_examples_from_shards(specs, tmp_path):
    from datamodules.shapes import make_sample, write_shapes_shards

    write_shapes_shards(tmp_path, train=0, val=4, workers=1)
    plugins = {n: s.plugin for n, s in specs.items()}
    held = M.HeldOut(plugins, SIZE, data=str(tmp_path / "val-*.tar"))
    maps, caption, image = held(1)
    ref = make_sample(0, 1, 32, split="val")
    assert caption == ref.caption and image.shape == (1, 3, 32, 32)
    assert torch.equal(maps["segmentation"][0], torch.from_numpy(ref.seg.astype(np.int64)))
    assert set(maps) == set(plugins) and maps["sketch"].shape == (1, 1, 32, 32)
    _, caption5, _ = held(5)  # past the end: wraps around
    assert caption5 == make_sample(0, 1, 32, split="val").caption


def test_gather_maps_takes_a_file_then_a_canvas_then_the_example():
    from mcm.cli.app import gather_maps

    seg = _plugin("segmentation")
    specs = {"segmentation": M.canvas_spec("segmentation", seg), "sketch": M.canvas_spec("sketch", _plugin("sketch"))}
    example = {"segmentation": torch.zeros(32, 32, dtype=torch.long)}
    maps, notes, empty = gather_maps(specs, (32, 32), ["segmentation", "sketch"], {}, {}, example)
    assert list(maps) == ["segmentation"] and empty == ["sketch"] and notes == []
    with pytest.raises(M.AppError, match="nothing to condition on"):
        gather_maps(specs, (32, 32), ["sketch"], {}, {}, example)
