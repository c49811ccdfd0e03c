"""``mcm data encode`` and cached shards read by the DataModule (issue #17 items 1 and 3).

Tiny random bases (``tiny_models``), shards written member by member (``shard_fixtures``).
Tolerances: cached arrays are fp16, so a value read back is within fp16 rounding of the float32
one (|error| <= 2^-11 |x| + 1e-6, the last for batch-size-dependent float32 kernels; measured RMS
relative error 2.0e-4 for latents and text embeddings of the tiny SD and SDXL); the loss from cached
shards equals the loss from raw shards to rtol 1e-4 (measured: 1e-7 relative on the tiny SD).
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mcm.training.encode import encode_shards
from datamodules.shard_datamodule import ShardDataModule
from shard_fixtures import png, sample_members, truncate, write_tar

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # steps run without a Trainer

FP16_REL, FP16_ABS = 2.0**-11, 1e-6  # fp16 unit roundoff; float32 kernels differ ~1e-7 by batch size
CAPTIONS = ["a red circle", "a blue square", "", "a photo of a cat"]


def _shards(folder: Path, n_shards: int, per_shard: int, h: int, w: int, seed: int = 0) -> list[Path]:
    """Random RGB images (h x w) with segmentation maps and captions."""
    rng, paths = np.random.default_rng(seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            seg = rng.integers(0, 6, (h, w), dtype=np.uint8)
            members += sample_members(f"s{s}_{i:02d}", img, seg, caption=CAPTIONS[i % len(CAPTIONS)])
        paths.append(write_tar(folder / f"train-{s:02d}.tar", members))
    return paths


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def _npy(b: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(b), allow_pickle=False).astype(np.float32))


def _assert_fp16_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within fp16 rounding of the float32 value (and not equal by accident of shape: same shape)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got - want).abs()
    assert (err <= FP16_REL * want.abs() + FP16_ABS).all(), f"{what}: max error {float(err.max()):.3g}"


def _presented(png_bytes: bytes, size: int) -> torch.Tensor:
    """The DataModule's presentation without random augmentation, computed here with torchvision directly."""
    from PIL import Image

    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB")).copy()).permute(2, 0, 1)
    return TF.center_crop(TF.resize(img, size, antialias=True), size).float() / 127.5 - 1.0


def _dm(shards, **kw) -> ShardDataModule:
    args = dict(modalities={"segmentation": {"num_classes": 6}}, image_size=64, batch_size=4, num_workers=0,
                shuffle_buffer=0, hflip=0.5, crop_scale=(1.0, 1.0), seed=3)
    return ShardDataModule(train_shards=shards, val_shards=shards, **{**args, **kw})


# ---- 1. round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("family, size", [("sd", 64), ("sdxl", 16)])
def test_encode_round_trip(family, size, tmp_path, request):
    """Members unchanged plus latent / latent_flip / text embeddings equal to the base's own encodings of
    the presented image (80x96 input: resize + centre crop), its mirror, and the caption."""
    from mcm.models.frozen_base import FrozenBase

    base_dir = request.getfixturevalue("tiny_sd_dir" if family == "sd" else "tiny_sdxl_dir")
    raw = _shards(tmp_path / "raw", 1, 3, size + size // 4, size + size // 2)
    report = encode_shards(str(base_dir), [str(raw[0])], tmp_path / "out", image_size=size, batch_size=2)
    assert (report.samples, report.bad, len(report.shards_done)) == (3, 0, 1)
    base = FrozenBase.from_pretrained(base_dir)
    before, after = _members(raw[0]), _members(tmp_path / "out" / raw[0].name)
    assert all(after[k] == v for k, v in before.items()), "original members must be copied unchanged"
    ctx_members = ["text_emb.npy"] + (["text_embeds.npy", "time_ids.npy"] if family == "sdxl" else [])
    assert set(after) - set(before) == {f"s0_{i:02d}.{m}" for i in range(3)
                                        for m in ["latent.npy", "latent_flip.npy", "base_hash.txt", *ctx_members]}
    for i in range(3):
        key = f"s0_{i:02d}"
        image = _presented(before[f"{key}.png"], size)[None]  # (1, 3, S, S)
        _assert_fp16_close(_npy(after[f"{key}.latent.npy"]), base.encode_images(image)[0], key)
        _assert_fp16_close(_npy(after[f"{key}.latent_flip.npy"]), base.encode_images(image.flip(-1))[0], key)
        ctx = base.encode_context([CAPTIONS[i]], batch_size=1, image_size=(size, size))
        if family == "sd":
            _assert_fp16_close(_npy(after[f"{key}.text_emb.npy"]), ctx[0], key)
        else:
            _assert_fp16_close(_npy(after[f"{key}.text_emb.npy"]), ctx["prompt_embeds"][0], key)
            _assert_fp16_close(_npy(after[f"{key}.text_embeds.npy"]), ctx["text_embeds"][0], key)
            assert torch.equal(_npy(after[f"{key}.time_ids.npy"]), ctx["time_ids"][0])  # fp32, exact
    # the DataModule reads them back in the dict form encode_context gives
    import json

    rec = json.loads((tmp_path / "out" / "base.json").read_text())
    assert (rec["hash"], rec["source"], rec["family"], rec["image_size"], rec["dtype"]) == (
        base.content_hash(), str(base_dir), family, size, "float32")
    assert {after[f"s0_{i:02d}.base_hash.txt"] for i in range(3)} == {base.content_hash().encode()}
    dm = _dm(str(tmp_path / "out" / raw[0].name), image_size=size, batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    assert dm.cached_base["hash"] == base.content_hash()
    if family == "sdxl":
        assert set(batch["text_emb"]) == {"prompt_embeds", "text_embeds", "time_ids"}
        assert batch["text_emb"]["prompt_embeds"].shape[0] == 3 and batch["text_emb"]["time_ids"].dtype == torch.float32
    _assert_fp16_close(batch["latent"], base.encode_images(batch["image"]), "val batch")


# ---- 2. the same loss from raw and from cached shards --------------------------------------------

def test_cached_shards_give_the_raw_loss(tiny_sd_dir, tmp_path, caplog):
    """Same DataModule config, same seed: the batch from cached shards (flips picked from latent_flip) gives
    the training loss of the batch from raw shards; crop_scale != [1, 1] is disabled with one warning."""
    from mcm.training.mcm_module import MCMModule

    raw = _shards(tmp_path / "raw", 2, 4, 64, 64)
    encode_shards(str(tiny_sd_dir), [str(p) for p in raw], tmp_path / "out", batch_size=4)
    torch.manual_seed(0)
    module = MCMModule(base=str(tiny_sd_dir), modalities={"segmentation": {"num_classes": 6}},
                       block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8,
                       caption_dropout=0.3)
    torch.nn.init.normal_(module.mcm.unet.conv_out.weight, std=0.05)  # not a no-op
    raw_dm = _dm(str(tmp_path / "raw" / "train-*.tar"))
    with caplog.at_level(logging.WARNING, logger="datamodules.shard_datamodule"):
        cached_dm = _dm(str(tmp_path / "out" / "train-*.tar"), crop_scale=(0.5, 0.9))
        cached_batches = list(cached_dm.train_dataloader())
    warnings = [r for r in caplog.records if "random crop" in r.getMessage()]
    assert len(warnings) == 1 and "disabled" in warnings[0].getMessage()
    raw_batches = list(raw_dm.train_dataloader())
    assert raw_dm.cached_base is None and cached_dm.cached_base["shard_dir"] == str(tmp_path / "out")
    flipped = 0
    for rb, cb in zip(raw_batches, cached_batches):
        assert rb["key"] == cb["key"] and "latent" not in rb and "latent" in cb
        assert torch.equal(rb["image"], cb["image"]) and torch.equal(rb["segmentation"], cb["segmentation"])
        _assert_fp16_close(cb["latent"], module.base.encode_images(cb["image"]), "train latent")
        _assert_fp16_close(cb["text_emb"], module.base.encode_text(list(cb["caption"])), "text_emb")
        for seed in (1, 2):
            torch.manual_seed(seed)
            a = module._common_step(rb, "train")
            torch.manual_seed(seed)
            b = module._common_step(cb, "train")
            torch.testing.assert_close(b, a, rtol=1e-4, atol=0)
        raw_unflipped = torch.stack([_presented(png_for(tmp_path / "raw", k), 64) for k in rb["key"]])
        flipped += int((~(rb["image"] == raw_unflipped).flatten(1).all(1)).sum())
    assert 0 < flipped < 8, f"{flipped} of 8 samples flipped: both branches must be exercised"


def png_for(folder: Path, key: str) -> bytes:
    for p in sorted(folder.glob("*.tar")):
        m = _members(p)
        if f"{key}.png" in m:
            return m[f"{key}.png"]
    raise KeyError(key)


# ---- 3. another base's shards are refused --------------------------------------------------------

def test_shards_of_another_base_are_refused(tiny_sd_dir, tmp_path):
    from mcm.models.frozen_base import BaseMismatchError
    from mcm.training.mcm_module import MCMModule
    from tiny_models import make_tiny_sd

    other = make_tiny_sd(tmp_path / "other_sd", seed=5)
    raw = _shards(tmp_path / "raw", 1, 4, 64, 64)
    encode_shards(str(other), [str(raw[0])], tmp_path / "out")
    dm = _dm(str(tmp_path / "out" / "train-00.tar"))
    kw = dict(modalities={"segmentation": {"num_classes": 6}}, block_out_channels=(16, 32), layers_per_block=1,
              attention_levels=(1,), norm_num_groups=8)
    module = MCMModule(base=str(tiny_sd_dir), **kw)
    module._trainer = SimpleNamespace(datamodule=dm, loggers=[])  # what on_fit_start sees under a Trainer
    with pytest.raises(BaseMismatchError) as e:
        module.on_fit_start()
    msg = str(e.value)
    for part in (str(tmp_path / "out"), str(other), str(tiny_sd_dir), dm.cached_base["hash"][:12],
                 module.base.content_hash()[:12], "mcm data encode --base"):
        assert part in msg, (part, msg)
    MCMModule(base=str(tiny_sd_dir), force_base=True, **kw).check_cached_base(dm)  # forced: accepted
    MCMModule(base=str(other), **kw).check_cached_base(dm)  # the right base: accepted


def test_remote_shards_of_another_base_are_refused_batch_by_batch(tiny_sd_dir, tmp_path):
    """Shards read through ``pipe:`` have no readable folder (no base.json check): each sample's
    base_hash.txt is checked by the training step instead, naming a sample key and both hashes."""
    from mcm.models.frozen_base import BaseMismatchError
    from mcm.training.mcm_module import MCMModule
    from tiny_models import make_tiny_sd

    other = make_tiny_sd(tmp_path / "other_sd", seed=5)
    raw = _shards(tmp_path / "raw", 1, 4, 64, 64)
    encode_shards(str(other), [str(raw[0])], tmp_path / "out")
    dm = _dm(f"pipe:cat {tmp_path / 'out' / 'train-00.tar'}")
    assert dm.cached_base is None  # nothing to read next to a pipe
    batch = next(iter(dm.val_dataloader()))
    assert batch["base_hash"] == [_base_hash(other)] * 4
    kw = dict(modalities={"segmentation": {"num_classes": 6}}, block_out_channels=(16, 32), layers_per_block=1,
              attention_levels=(1,), norm_num_groups=8)
    module = MCMModule(base=str(tiny_sd_dir), **kw)
    with pytest.raises(BaseMismatchError) as e:
        module.validation_step(batch, 0)
    msg = str(e.value)
    for part in ("4 of 4", "'s0_00'", _base_hash(other)[:12], module.base.content_hash()[:12],
                 "mcm data encode --base"):
        assert part in msg, (part, msg)
    loss = MCMModule(base=str(other), **kw).validation_step(batch, 0)  # the right base: trains
    assert torch.isfinite(loss)


def _base_hash(path) -> str:
    from mcm.models.frozen_base import FrozenBase

    return FrozenBase.from_pretrained(path).content_hash()


# ---- 4. resume -------------------------------------------------------------------------------------

def test_resume_skips_complete_shards_and_redoes_partial_ones(tiny_sd_dir, tmp_path, caplog):
    from mcm.cli.tool_commands import run_tool_command

    raw = _shards(tmp_path / "raw", 3, 2, 64, 64)
    out = tmp_path / "out"
    argv = ["data", "encode", "--base", str(tiny_sd_dir), str(tmp_path / "raw" / "train-{00..02}.tar"),
            "--out", str(out), "--batch-size", "2"]
    assert run_tool_command(argv) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert sorted(first) == [p.name for p in raw]
    (out / "train-01.tar").rename(out / "train-01.tar.tmp")  # interrupted while writing shard 1 ...
    truncate(out / "train-01.tar.tmp", 3000)
    (out / "train-02.tar").unlink()  # ... and shard 2 never started
    with caplog.at_level(logging.INFO, logger="mcm.training.encode"):
        report = encode_shards(str(tiny_sd_dir), [str(p) for p in raw], out, batch_size=2)
    assert report.shards_skipped == [str(out / "train-00.tar")]
    assert sorted(report.shards_done) == [str(raw[1]), str(raw[2])] and report.samples == 4
    log = caplog.text
    assert "train-00.tar: complete from an earlier run, skipping" in log and "train-01.tar: partial" in log
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first and not list(out.glob("*.tmp"))
    with pytest.raises(ValueError, match="other settings.*flip"):  # same --out, other settings: refused
        encode_shards(str(tiny_sd_dir), [str(p) for p in raw], out, flip=False)


# ---- 5. bad samples --------------------------------------------------------------------------------

def test_bad_samples_are_skipped_and_counted_like_the_datamodule(tiny_sd_dir, tmp_path):
    """A corrupt png and a truncated shard's last sample: 2 bad, as the DataModule counts the raw shards."""
    img = np.zeros((64, 64, 3), np.uint8)
    seg = np.zeros((64, 64), np.uint8)
    good = [m for i in range(3) for m in sample_members(f"a{i}", img + 40 * i, seg)]
    corrupt = [("bad.png", b"not a png"), ("bad.seg.png", png(seg)), ("bad.txt", b"x")]
    (tmp_path / "raw").mkdir()
    write_tar(tmp_path / "raw" / "a.tar", good[:6] + corrupt + good[6:])
    write_tar(tmp_path / "raw" / "b.tar", [m for i in range(3) for m in sample_members(f"b{i}", img, seg)])
    truncate(tmp_path / "raw" / "b.tar", 7000)  # inside the last samples' members
    report = encode_shards(str(tiny_sd_dir), [str(tmp_path / "raw" / "*.tar")], tmp_path / "out")
    dm = _dm(str(tmp_path / "raw" / "*.tar"), batch_size=1)
    batches = list(dm.val_dataloader())
    raw_bad = sum(int(b["skipped"]) for b in batches)
    assert report.bad == raw_bad == 2
    assert report.samples == len(batches)
    assert "bad.png" not in _members(tmp_path / "out" / "a.tar")
    cached = list(_dm(str(tmp_path / "out" / "*.tar"), batch_size=1).val_dataloader())
    assert [b["key"] for b in cached] == [b["key"] for b in batches]
    assert sum(int(b["skipped"]) for b in cached) == 0


# ---- 6. workers ------------------------------------------------------------------------------------

def test_workers_give_byte_identical_shards(tiny_sd_dir, tmp_path):
    raw = _shards(tmp_path / "raw", 3, 3, 64, 64)
    a = encode_shards(str(tiny_sd_dir), [str(p) for p in raw], tmp_path / "w0", workers=0, batch_size=2)
    b = encode_shards(str(tiny_sd_dir), [str(p) for p in raw], tmp_path / "w2", workers=2, batch_size=2)
    assert a.samples == b.samples == 9
    for p in raw:
        assert (tmp_path / "w0" / p.name).read_bytes() == (tmp_path / "w2" / p.name).read_bytes(), p.name
    assert (tmp_path / "w0" / "base.json").read_text() == (tmp_path / "w2" / "base.json").read_text()


# ---- 7. the reader: predictions, --no-flip shards, a pickled member -------------------------------

def _npy_bytes(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_reader_with_predictions_no_flip_and_a_pickled_member(tmp_path):
    """Prediction arrays arrive as (B, K, ...) float32 / int64 and switch flip off (hflip=1 here); a shard
    without latent_flip.npy is not flipped either; a pickled .npy member is a bad sample, never unpickled."""
    image, seg = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)
    image[:, :32] = 200  # left half bright: a flip would move it right
    rng = np.random.default_rng(0)
    with_preds, no_flip = [], []
    for i in range(4):
        base = sample_members(f"p{i}", image, seg)
        lat = rng.standard_normal((4, 8, 8)).astype(np.float16)
        with_preds += base + [(f"p{i}.latent.npy", _npy_bytes(lat)), (f"p{i}.latent_flip.npy", _npy_bytes(-lat)),
                              (f"p{i}.pred_t.npy", _npy_bytes(np.array([5, 900], np.int64))),
                              (f"p{i}.xt.npy", _npy_bytes(np.full((2, 4, 8, 8), i, np.float16))),
                              (f"p{i}.pred.npy", _npy_bytes(np.zeros((2, 4, 8, 8), np.float16)))]
        no_flip += [(n.replace("p", "n", 1), d) for n, d in base] + [(f"n{i}.latent.npy", _npy_bytes(lat))]
    pickled = sample_members("bad", image, seg) + [("bad.latent.npy", _npy_bytes(np.array([{"x": 1}]), True))]
    write_tar(tmp_path / "preds.tar", with_preds)
    write_tar(tmp_path / "noflip.tar", no_flip + pickled)
    left_bright = lambda b: bool((b["image"][:, :, :, :32].mean() > b["image"][:, :, :, 32:].mean()))  # noqa: E731
    b = next(iter(_dm(str(tmp_path / "preds.tar"), hflip=1.0).train_dataloader()))
    # one of the K = 2 draws per sample (the K axis kept), the same draw in every member
    assert b["pred_t"].dtype == torch.int64 and b["pred_t"].shape == (4, 1)
    assert set(b["pred_t"].flatten().tolist()) <= {5, 900}
    assert b["xt"].dtype == torch.float32 and b["xt"].shape == b["pred"].shape == (4, 1, 4, 8, 8)
    assert sorted(b["xt"][:, 0, 0, 0, 0].tolist()) == [0.0, 1.0, 2.0, 3.0] and left_bright(b)
    val = next(iter(_dm(str(tmp_path / "preds.tar"), batch_size=4).val_dataloader()))
    assert val["pred_t"].tolist() == [[5]] * 4  # validation: draw 0
    loader = _dm(str(tmp_path / "noflip.tar"), hflip=1.0).val_dataloader()
    batches = list(loader)
    assert sum(int(x["skipped"]) for x in batches) == 1 and all("bad" not in x["key"] for x in batches)
    b = next(iter(_dm(str(tmp_path / "noflip.tar"), hflip=1.0, batch_size=2).train_dataloader()))
    assert left_bright(b) and b["latent"].shape == (2, 4, 8, 8)


def test_predictions_are_cached_for_the_stored_latent_and_text(tiny_sd_dir, tmp_path, caplog):
    """--predictions 2: pred equals the base's prediction for the stored xt, t and the cached text_emb;
    base.json records K; reading them turns crop and flip off with one warning."""
    from mcm.models.frozen_base import FrozenBase

    raw = _shards(tmp_path / "raw", 1, 3, 64, 64)
    encode_shards(str(tiny_sd_dir), [str(raw[0])], tmp_path / "out", predictions=2, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="datamodules.shard_datamodule"):
        b = next(iter(_dm(str(tmp_path / "out" / raw[0].name), batch_size=3, hflip=1.0,
                          crop_scale=(0.5, 0.9)).train_dataloader()))
    assert "random crop" in caplog.text and "horizontal flip (the cached predictions" in caplog.text
    assert b["pred_t"].shape == (3, 1) and b["xt"].shape == b["pred"].shape == b["pred_uncond"].shape == (3, 1, 4, 8, 8)
    base = FrozenBase.from_pretrained(tiny_sd_dir)
    want = base.predict(b["xt"][:, 0], b["pred_t"][:, 0], b["text_emb"])  # the draw each sample kept
    _assert_fp16_close(b["pred"][:, 0], want, "pred of the kept draw")
    unflipped = torch.stack([_presented(png_for(tmp_path / "raw", k), 64) for k in b["key"]])
    assert torch.equal(b["image"], unflipped)  # hflip=1.0, but the predictions are for the unflipped image


def test_pick_prediction_draw_keeps_one_draw_of_every_member():
    from datamodules.cached_fields import pick_prediction_draw
    from datamodules.sample_decoding import BadSampleError

    K = 8
    cached = {"pred_t": torch.arange(K) * 100, "xt": torch.arange(K, dtype=torch.float32).view(K, 1, 1, 1),
              "pred": -torch.arange(K, dtype=torch.float32).view(K, 1, 1, 1), "latent": torch.zeros(4, 2, 2)}
    seen = set()
    for seed in range(40):
        out = pick_prediction_draw(cached, torch.Generator().manual_seed(seed))
        j = int(out["pred_t"][0]) // 100
        assert out["pred_t"].shape == (1,) and out["xt"].shape == (1, 1, 1, 1)
        assert out["xt"].item() == j and out["pred"].item() == -j and out["latent"] is cached["latent"]
        seen.add(j)
    assert seen == set(range(K))  # uniform over the K draws: all eight appear in 40 picks
    again = pick_prediction_draw(cached, torch.Generator().manual_seed(7))
    assert torch.equal(again["xt"], pick_prediction_draw(cached, torch.Generator().manual_seed(7))["xt"])
    assert pick_prediction_draw(cached, None)["pred_t"].tolist() == [0]  # evaluation: draw 0
    with pytest.raises(BadSampleError, match=r"'pred_t': 8, 'xt': 8, 'pred': 3.*same K"):
        pick_prediction_draw({**cached, "pred": torch.zeros(3, 1, 1, 1)}, None)


def test_a_sample_whose_prediction_members_disagree_on_k_is_skipped_by_name(tmp_path, caplog):
    image, seg = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)
    members = []
    for i in range(3):
        k_pred = 3 if i == 1 else 2  # sample p1: pred.npy holds 3 draws, the others 2
        members += sample_members(f"p{i}", image, seg) + [
            (f"p{i}.pred_t.npy", _npy_bytes(np.array([5, 900], np.int64))),
            (f"p{i}.xt.npy", _npy_bytes(np.zeros((2, 4, 8, 8), np.float16))),
            (f"p{i}.pred.npy", _npy_bytes(np.zeros((k_pred, 4, 8, 8), np.float16)))]
    write_tar(tmp_path / "k.tar", members)
    with caplog.at_level(logging.WARNING):
        batches = list(_dm(str(tmp_path / "k.tar"), batch_size=1).val_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == ["p0", "p2"]
    assert sum(int(b["skipped"]) for b in batches) == 1
    assert "p1" in caplog.text and "cached prediction members" in caplog.text and "same K" in caplog.text
