"""The bad-input sweep (docs/reliability.md, section 6): one row per case across the pipeline's arguments,
region masks, strengths, exported modules, checkpoints, YAML configs, shard samples and cached (precomputed)
batch entries.  Each case checks the exception type and that the message names the thing at fault and what
was expected.  (Bad condition maps and bad training batches have their own tables in test_reliability.py.)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import modalities
from datamodules.sample_decoding import ShardDecodeError
from datamodules.shard_stream import ShardStream
from mcm.models.frozen_base import BaseMismatchError, FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.pipelines import MCMPipeline, save_module
from mcm.training.checkpoint_io import AtomicCheckpointIO
from mcm.training.export import export_checkpoint
from mcm.training.mcm_module import MCMModule
from shard_fixtures import png

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

REPO = Path(__file__).resolve().parents[1]
MULTIMODAL = REPO / "experiments" / "shapes32" / "multimodal.yaml"
SEG = {"segmentation": {"num_classes": 6}}
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ctx(tiny_pixel_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    base = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    torch.manual_seed(0)
    mcm = MultimodalConditioningModule(latent_channels=3, modalities=SEG, **SMALL)
    export = save_module(mcm, root / "export", base)
    module = MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL, ema_decay=0.9)
    ckpt = {"state_dict": module.state_dict(), "global_step": 1}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, root / "good.ckpt")
    return {"root": root, "base": base, "mcm": mcm, "export": export, "pipe": MCMPipeline.from_pretrained(export),
            "module": module, "ckpt": ckpt, "seg": torch.randint(0, 6, (1, 16, 16))}


# ---- helpers that make one broken file each ---------------------------------------------------------------

def broken_export(ctx, name: str, edit) -> Path:
    d = ctx["root"] / f"export_{name}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(ctx["export"], d)
    edit(d)
    return d


def _drop_tensor(d):
    sd = load_file(d / WEIGHTS)
    del sd["unet.conv_in.bias"]
    save_file(sd, d / WEIGHTS)


def _extra_tensor(d):
    save_file({**load_file(d / WEIGHTS), "unet.stray.weight": torch.zeros(3)}, d / WEIGHTS)


def _wrong_shape(d):
    save_file({**load_file(d / WEIGHTS), "unet.conv_out.weight": torch.zeros(1, 1, 1, 1)}, d / WEIGHTS)


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _other_base(d):
    info = json.loads((d / "mcm_base.json").read_text())
    (d / "mcm_base.json").write_text(json.dumps({**info, "hash": "0" * 64}))


def _config_modality(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "modalities": {"segmentaton": {"num_classes": 6}}}))


def broken_ckpt(ctx, name: str, edit) -> Path:
    ck = {**ctx["ckpt"], "state_dict": dict(ctx["ckpt"]["state_dict"]), "ema": dict(ctx["ckpt"]["ema"])}
    edit(ck)
    path = ctx["root"] / f"{name}.ckpt"
    torch.save(ck, path)
    return path


def raw_file(ctx, name: str, data: bytes) -> Path:
    path = ctx["root"] / name
    path.write_bytes(data)
    return path


def truncated_ckpt(ctx) -> Path:
    data = (ctx["root"] / "good.ckpt").read_bytes()
    return raw_file(ctx, "truncated.ckpt", data[: len(data) // 2])


def two(ctx):
    return MCMPipeline.from_base(ctx["base"], [ctx["mcm"], ctx["mcm"]])


def decode(fields: dict, plugins: dict | None = None):
    plugins = plugins or {"segmentation": modalities.get("segmentation", num_classes=6)}
    stream = ShardStream(["shard-000.tar"], plugins, 16, 2, train=False)
    return stream._decode({"__key__": "k7", "__url__": "shard-000.tar",
                           "png": png(np.full((16, 16, 3), 90, np.uint8)), **fields})


def step_with(ctx, **entries):
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "caption": ["a", "b"], "key": ["a", "b"],
             "segmentation": torch.randint(0, 6, (2, 16, 16), generator=g), **entries}
    return ctx["module"]._common_step(batch, "train")


K = dict(num_inference_steps=1)
SEGMAP = torch.randint(0, 6, (1, 16, 16))
# (id, what is wrong, call, exception type, fragments the message must contain)
CASES = [
    # -- the pipeline's arguments
    ("steps-zero", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, num_inference_steps=0, output_type="pt").images, ValueError,
     ["num_inference_steps", "positive integer", "got 0"]),
    ("steps-float", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, num_inference_steps=2.5, output_type="pt").images, ValueError,
     ["num_inference_steps", "got 2.5"]),
    ("guidance-nan", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, guidance_scale=float("nan"), **K, output_type="pt").images,
     ValueError, ["guidance_scale", "finite number", "nan"]),
    ("prompt-count", lambda c: c["pipe"](conditions={"segmentation": torch.randint(0, 6, (2, 16, 16))},
                                         prompt=["a", "b", "c"], **K, output_type="pt").images, ValueError, ["prompt", "3 prompts", "2 images"]),
    ("output-type", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, output_type="jpeg", **K).images, ValueError,
     ["output_type", "'pt'", "'jpeg'"]),
    ("window-out-of-range", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, modulation_window=(0.2, 1.5),
                                                **K, output_type="pt").images,
     ValueError, ["modulation_window", "0 <= low <= high <= 1", "1.5"]),
    ("class-labels-on-text-base", lambda c: c["pipe"](conditions={}, class_labels=[1], **K, output_type="pt").images, ValueError,
     ["class_labels", "not class-conditional"]),
    ("unknown-builtin-module", lambda c: MCMPipeline.from_pretrained("shapes23"), FileNotFoundError,
     ["module 'shapes23'", "built-in module", "did you mean 'shapes32'"]),
    # -- strengths
    ("strength-nan", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, strength=float("nan"), **K, output_type="pt").images,
     ValueError, ["strength", "finite number", "nan"]),
    ("strength-map-size", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, strength=torch.ones(8, 8), **K, output_type="pt").images,
     ValueError, ["strength", "16x16", "(8, 8)"]),
    ("strength-schedule-length", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, strength=[1.0, 2.0],
                                                     num_inference_steps=3, output_type="pt").images, ValueError,
     ["strength", "one value per inference step (3)", "got 2"]),
    ("strength-type", lambda c: c["pipe"](conditions={"segmentation": SEGMAP}, strength="strong", **K, output_type="pt").images, ValueError,
     ["strength", "expected a float", "str"]),
    # -- region masks
    ("region-channels", lambda c: two(c)(conditions=[{"segmentation": SEGMAP}] * 2,
                                         regions=[torch.rand(1, 3, 16, 16), None], **K, output_type="pt").images, ValueError,
     ["regions[0]", "(B, 1, H, W)", "(1, 3, 16, 16)"]),
    ("region-range", lambda c: two(c)(conditions=[{"segmentation": SEGMAP}] * 2,
                                      regions=[torch.full((16, 16), 2.0), None], **K, output_type="pt").images, ValueError,
     ["regions[0]", "[0.0, 1.0]", "[2, 2]"]),
    ("region-nan", lambda c: two(c)(conditions=[{"segmentation": SEGMAP}] * 2,
                                    regions=[torch.full((16, 16), float("nan")), None], **K, output_type="pt").images, ValueError,
     ["regions[0]", "finite", "NaN/Inf"]),
    ("region-count", lambda c: two(c)(conditions=[{"segmentation": SEGMAP}] * 2, regions=[torch.ones(16, 16)], **K, output_type="pt").images,
     ValueError, ["regions", "2 masks", "got 1"]),
    ("region-size", lambda c: two(c)(conditions=[{"segmentation": SEGMAP}] * 2, regions=[torch.ones(8, 8), None],
                                     **K, output_type="pt").images, ValueError, ["regions[0]", "16x16", "(8, 8)"]),
    # -- exported modules
    ("export-missing-tensor", lambda c: MCMPipeline.from_pretrained(broken_export(c, "missing", _drop_tensor)),
     ValueError, [WEIGHTS, "1 missing ['unet.conv_in.bias']", "do not belong to this config"]),
    ("export-extra-tensor", lambda c: MCMPipeline.from_pretrained(broken_export(c, "extra", _extra_tensor)),
     ValueError, [WEIGHTS, "1 unexpected ['unet.stray.weight']"]),
    ("export-tensor-shape", lambda c: MCMPipeline.from_pretrained(broken_export(c, "shape", _wrong_shape)),
     ValueError, ["export_shape", "unet.conv_out.weight", "expected shape"]),
    ("export-truncated", lambda c: MCMPipeline.from_pretrained(
        broken_export(c, "truncated", lambda d: _truncate(d / WEIGHTS))), ValueError,
     [WEIGHTS, "not a complete safetensors file", "truncated"]),
    ("export-no-weights", lambda c: MCMPipeline.from_pretrained(
        broken_export(c, "noweights", lambda d: (d / WEIGHTS).unlink())), FileNotFoundError,
     ["export_noweights", WEIGHTS, "config.json"]),
    ("export-corrupt-config", lambda c: MCMPipeline.from_pretrained(
        broken_export(c, "json", lambda d: (d / "config.json").write_text("{not json"))), ValueError,
     ["config.json", "not valid JSON"]),
    ("export-other-base", lambda c: MCMPipeline.from_pretrained(broken_export(c, "base", _other_base)),
     BaseMismatchError, ["export_base", "trained on base", "force_base=True"]),
    ("export-unknown-modality", lambda c: MCMPipeline.from_pretrained(broken_export(c, "mod", _config_modality)),
     modalities.ModalityError, ["unknown modality 'segmentaton'", "Did you mean 'segmentation'"]),
    # -- checkpoints (mcm export, --ckpt_path resumes)
    ("ckpt-missing-file", lambda c: export_checkpoint(c["root"] / "nope.ckpt", c["root"] / "o"), FileNotFoundError,
     ["nope.ckpt", "does not exist"]),
    ("ckpt-truncated-export", lambda c: export_checkpoint(truncated_ckpt(c), c["root"] / "o"), ValueError,
     ["truncated.ckpt", "not a readable torch checkpoint", "truncated or corrupt"]),
    ("ckpt-truncated-resume", lambda c: AtomicCheckpointIO().load_checkpoint(truncated_ckpt(c)), ValueError,
     ["truncated.ckpt", "not a readable torch checkpoint", "earlier checkpoint"]),
    ("ckpt-random-bytes", lambda c: export_checkpoint(raw_file(c, "junk.ckpt", b"hello world" * 10),
                                                      c["root"] / "o"), ValueError,
     ["junk.ckpt", "not a readable torch checkpoint"]),
    ("ckpt-missing-tensor", lambda c: export_checkpoint(broken_ckpt(
        c, "missing", lambda k: k["state_dict"].pop("mcm.unet.conv_in.bias")), c["root"] / "o"), ValueError,
     ["missing.ckpt", "1 missing ['mcm.unet.conv_in.bias']"]),
    ("ckpt-extra-tensor", lambda c: export_checkpoint(broken_ckpt(
        c, "extra", lambda k: k["state_dict"].update({"mcm.stray": torch.zeros(2)})), c["root"] / "o"), ValueError,
     ["extra.ckpt", "1 unexpected ['mcm.stray']"]),
    ("ckpt-tensor-shape", lambda c: export_checkpoint(broken_ckpt(
        c, "shape", lambda k: k["state_dict"].update({"mcm.unet.conv_in.bias": torch.zeros(1)})), c["root"] / "o"),
     ValueError, ["shape.ckpt", "1 of another shape ['mcm.unet.conv_in.bias']"]),
    ("ckpt-ema-short", lambda c: export_checkpoint(broken_ckpt(
        c, "ema", lambda k: k["ema"].update(shadow_params=k["ema"]["shadow_params"][:-1])), c["root"] / "o"),
     ValueError, ["ema.ckpt", "EMA holds", "--no-ema"]),
    ("ckpt-not-an-adapter", lambda c: export_checkpoint(broken_ckpt(c, "other", lambda k: k.pop("mcm_config")),
                                                        c["root"] / "o"), ValueError,
     ["other.ckpt", "not written by an adapter LightningModule", "mcm_config"]),
    ("export-strength", lambda c: export_checkpoint(c["root"] / "good.ckpt", c["root"] / "o", strength=-1.0),
     ValueError, ["--strength", "positive number", "-1"]),
    # -- shard samples (decode / validation errors: skipped and counted in a run; here the error itself)
    ("shard-seg-not-png", lambda c: decode({"seg.png": b"\x89PNG\r\n\x1a\n nope"}), ShardDecodeError,
     ["shard-000.tar", "sample 'k7'", "field 'seg.png'", "not a readable image", "class ids 0..5"]),
    ("shard-seg-labels", lambda c: decode({"seg.png": png(np.full((16, 16), 9, np.uint8))}), ShardDecodeError,
     ["sample 'k7'", "field 'seg.png'", "labels in 0..5", "[9]"]),
    ("shard-seg-size", lambda c: decode({"seg.png": png(np.zeros((16, 12), np.uint8))}), ShardDecodeError,
     ["sample 'k7'", "field 'seg.png'", "(16, 12)", "(16, 16)"]),
    ("shard-seg-missing", lambda c: decode({}), ShardDecodeError,
     ["sample 'k7'", "'seg.png' (absent)", "none of the keys ['seg.png']"]),
    ("shard-depth-colour", lambda c: decode({"depth.png": png(np.random.default_rng(0).integers(
        0, 255, (16, 16, 3), dtype=np.uint8))}, {"depth": modalities.get("depth")}), ShardDecodeError,
     ["sample 'k7'", "field 'depth.png'", "greyscale depth PNG", "16-bit"]),
    ("shard-image-corrupt", lambda c: decode({"png": b"not an image", "seg.png": png(np.zeros((16, 16), np.uint8))}),
     ShardDecodeError, ["sample 'k7'", "field 'png'", "not a readable image", "PIL can read"]),
    ("shard-class-label", lambda c: decode({"cls": b"seven", "seg.png": png(np.zeros((16, 16), np.uint8))}),
     ShardDecodeError, ["sample 'k7'", "field 'cls' / json 'class_label'", "'seven'", "integer class label"]),
    # -- cached (precomputed) batch entries: latents and text embeddings from cached shards
    ("cached-latent-size", lambda c: step_with(c, latent=torch.zeros(2, 3, 8, 8)), ValueError,
     ["batch['latent']", "16x16", "(2, 3, 8, 8)", "another base"]),
    ("cached-latent-nan", lambda c: step_with(c, latent=torch.full((2, 3, 16, 16), float("nan"))), ValueError,
     ["batch['latent']", "finite", "NaN/Inf"]),
    ("cached-latent-batch", lambda c: step_with(c, latent=torch.zeros(3, 3, 16, 16)), ValueError,
     ["batch['latent']", "2 images", "(3, 3, 16, 16)"]),
    ("cached-text-emb-dtype", lambda c: step_with(c, text_emb=torch.zeros(2, 24, 32, dtype=torch.long)), ValueError,
     ["batch['text_emb']", "float tensor (B, L, D)", "torch.int64"]),
]


@pytest.mark.parametrize("fn,exc,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(ctx, fn, exc, fragments):
    with pytest.raises(exc) as err:
        fn(ctx)
    msg = str(err.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"{type(err.value).__name__}: {msg}\nmissing: {missing}"


# ---- YAML configs: LightningCLI / jsonargparse refuse them naming the key or file (exit status 2) ----------

CONFIG_CASES = [
    ("config-unknown-key", "model:\n  init_args:\n    lrr: 0.1\n", ["Option 'lrr' is not accepted"]),
    ("config-bad-value", "model:\n  init_args:\n    lr: fast\n", ["lr", "fast"]),
    ("config-class-typo", "model:\n  class_path: mcm.MCMModul\n", ["mcm.MCMModul"]),
    ("config-yaml-syntax", "model: [unclosed\n", ["Problems parsing config", "flow sequence"]),
    ("config-missing-file", None, ["nothere.yaml", "does not exist"]),
]


@pytest.mark.parametrize("text,fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_named(tmp_path, monkeypatch, capsys, text, fragments):
    from mcm.cli.lightning_cli import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mcm"])
    overlay = tmp_path / "nothere.yaml"
    if text is not None:
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        run_lightning_cli(["fit", "-c", str(MULTIMODAL), "-c", str(overlay)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    missing = [f for f in fragments if f not in err]
    assert not missing, f"{err[-2000:]}\nmissing: {missing}"
    assert not (tmp_path / "runs").exists()


def test_seeds_of_the_wrong_length_or_type_are_refused(tiny_pixel_base_dir):
    from mcm.models.frozen_base import FrozenBase
    from mcm.pipelines import MCMPipeline

    pipe = MCMPipeline.from_base(FrozenBase.from_pretrained(tiny_pixel_base_dir), [])
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="seeds: got 3 seeds for 2 images"):
        pipe(num_images=2, seeds=[1, 2, 3], num_inference_steps=2, output_type="pt").images
    with pytest.raises(ValueError, match="seeds: expected a list of integers"):
        pipe(num_images=1, seeds=["a"], num_inference_steps=2, output_type="pt").images
