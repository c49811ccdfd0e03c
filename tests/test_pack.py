"""``mcm data pack`` and ``mcm data inspect``: exact counts on tiny folders and shards."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import png_array, read_shard_members

from datamodules.inspect_shards import inspect_shards
from datamodules.pack import load_captions, pack_folder
from datamodules.shapes import make_sample, write_shapes_shards
from mcm.cli import main

W, H = 12, 8  # image size (W, H) of the user folder


def _save(arr_or_image: np.ndarray | Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    im.save(path)


@pytest.fixture
def folder(tmp_path: Path) -> dict:
    """6 good samples (one jpeg, one palette seg, one dotted stem, depth as 8/16-bit png and .npy),
    plus a5.png without seg (unpaired), x.png of random bytes (unreadable) and m.png whose seg is
    the wrong size (size mismatch)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "user"
    segs, depths = {}, {}
    for i, stem in enumerate(["a0", "a1", "a2", "a3", "a4", "b.v2", "a5", "m"]):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        ext = "jpg" if stem == "a1" else "png"
        _save(img, root / "images" / f"{stem}.{ext}")
        if stem == "a5":
            continue
        seg = rng.integers(0, 6, (H, W if stem != "m" else W - 2), dtype=np.uint8)
        if stem == "a2":  # palette image: index i is drawn in some colour; the indices must survive
            p = Image.fromarray(seg, "P")
            p.putpalette([v for c in range(256) for v in ((c * 40) % 256, 255 - c, (c * 7) % 256)])
            _save(p, root / "seg" / f"{stem}.png")
        else:
            _save(seg, root / "seg" / f"{stem}.png")
        segs[stem] = seg
        if stem == "a3":
            d = rng.random((H, W)).astype(np.float32)
            (root / "depth").mkdir(exist_ok=True)
            np.save(root / "depth" / "a3.npy", d)
            depths[stem] = np.round(d.astype(np.float64) * 65535).astype(np.uint16)
        elif stem == "a4":
            d8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
            _save(d8, root / "depth" / "a4.png")
            depths[stem] = d8.astype(np.uint16) * 257
        else:
            d16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
            _save(d16, root / "depth" / f"{stem}.png")
            depths[stem] = d16
    (root / "images" / "x.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    _save(np.zeros((H, W), np.uint8), root / "seg" / "x.png")
    _save(np.zeros((H, W), np.uint16), root / "depth" / "x.png")
    caps = {s: f"caption of {s}" for s in ["a0", "a1", "a2", "a3", "a4", "b.v2", "a5", "m", "x"]}
    (root / "caps.json").write_text(json.dumps(caps))
    return {"root": root, "segs": segs, "depths": depths, "caps": caps}






def _pack_args(root: Path, out: str) -> dict:
    return dict(images=root / "images", out=out, seg=root / "seg", depth=root / "depth",
                captions=root / "caps.json")


def test_pack_folder_skips_and_names_problems_packs_the_rest(folder: dict, tmp_path: Path, caplog) -> None:
    out = str(tmp_path / "shards" / "train-%06d.tar")
    with caplog.at_level(logging.WARNING):
        report = pack_folder(**_pack_args(folder["root"], out), maxcount=4)
    assert report.packed == 6 and len(report.shards) == 2
    assert [p.name for p in report.unpaired] == ["images/a5.png"]
    assert [p.name for p in report.unreadable] == ["images/x.png"]
    assert [p.name for p in report.size_mismatch] == ["seg/m.png"]
    for name in ("a5.png", "x.png", "m.png"):
        assert name in caplog.text
    assert "packed 6 samples into 2 shards; skipped 3 (unpaired 1, unreadable 1, size mismatch 1)" in caplog.text
    assert not list((tmp_path / "shards").glob("*.tmp"))

    samples = read_shard_members(report.shards)
    assert sorted(samples) == ["a0", "a1", "a2", "a3", "a4", "b_v2"]
    assert set(samples["a1"]) == {"jpg", "seg.png", "depth.png", "txt", "json"}
    assert set(samples["a0"]) == {"png", "seg.png", "depth.png", "txt", "json"}
    assert samples["a1"]["jpg"] == (folder["root"] / "images" / "a1.jpg").read_bytes()  # no recompression
    for stem, key in [("a0", "a0"), ("a1", "a1"), ("a2", "a2"), ("a3", "a3"), ("a4", "a4"), ("b.v2", "b_v2")]:
        np.testing.assert_array_equal(png_array(samples[key]["seg.png"]), folder["segs"][stem])  # exact ids
        depth = png_array(samples[key]["depth.png"])
        assert depth.dtype == np.uint16
        np.testing.assert_array_equal(depth, folder["depths"][stem])
        assert samples[key]["txt"].decode() == folder["caps"][stem]
    meta = json.loads(samples["b_v2"]["json"])
    assert meta["key_sanitized_from"] == "b.v2" and meta["files"]["image"] == "b.v2.png"
    assert (meta["width"], meta["height"]) == (W, H)


def test_cli_pack_exit_codes(folder: dict, tmp_path: Path, caplog) -> None:
    root = folder["root"]
    argv = ["data", "pack", "--images", str(root / "images"), "--seg", str(root / "seg"),
            "--depth", str(root / "depth"), "--captions", str(root / "caps.json")]
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "o" / "s-%03d.tar")])
    assert e.value.code == 0
    assert "images/x.png" in caplog.text and "images/a5.png" in caplog.text
    assert len(read_shard_members([str(tmp_path / "o" / "s-000.tar")])) == 6

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(root / "images" / "x.png", only_bad / "x.png")
    with pytest.raises(SystemExit) as e:  # nothing packed -> 1, and no empty shard left behind
        main(["data", "pack", "--images", str(only_bad), "--out", str(tmp_path / "o2" / "s-%03d.tar")])
    assert e.value.code == 1 and not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit) as e:  # no shard-number placeholder -> argument error
        main(["data", "pack", "--images", str(only_bad), "--out", str(tmp_path / "o3.tar")])
    assert e.value.code == 2 and "placeholder" in caplog.text


def test_caption_formats(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text('{"file": "dir/a.png", "caption": "A"}\n\n{"stem": "b.v2", "text": "B"}\n')
    assert load_captions(tmp_path / "c.jsonl") == {"a": "A", "b.v2": "B"}
    (tmp_path / "c.tsv").write_text("stem\tcaption\na\tone\ttab\nb.jpg\ttwo\n")
    assert load_captions(tmp_path / "c.tsv") == {"a": "one\ttab", "b": "two"}
    (tmp_path / "bad.tsv").write_text("a\tone\nno tab here\n")
    with pytest.raises(ValueError, match="line 2"):
        load_captions(tmp_path / "bad.tsv")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(out, train=20, val=0, shard_size=10, workers=1)
    return out


def test_inspect_counts_shapes(shapes_dir: Path) -> None:
    s = inspect_shards(str(shapes_dir / "train-{000000..000001}.tar"))
    expected = [make_sample(0, i, 32, "train") for i in range(20)]
    assert s["samples"] == 20 and list(s["shards"].values()) == [10, 10]
    assert s["keys"] == {"cls": 20, "depth.png": 20, "json": 20, "png": 20, "seg.png": 20, "txt": 20}
    assert s["image_sizes"] == {(32, 32): 20}
    ids, counts = np.unique(np.stack([e.seg for e in expected]), return_counts=True)
    assert s["seg_pixels"] == dict(zip(ids.tolist(), counts.tolist()))
    assert s["seg_samples"] == {c: sum(int((e.seg == c).any()) for e in expected) for c in ids.tolist()}
    depth = np.stack([e.depth for e in expected])
    assert s["depth_range"] == (int(depth.min()), int(depth.max()))
    assert s["captions"] == [e.caption for e in expected[:5]]
    assert s["unreadable_samples"] == s["unreadable_members"] == 0 and s["problems"] == []

    s = inspect_shards(str(shapes_dir / "train-*.tar"), max_samples=5)
    assert s["samples"] == 5 and s["stopped_early"]


def test_inspect_reports_truncated_tar(shapes_dir: Path, tmp_path: Path) -> None:
    data = (shapes_dir / "train-000001.tar").read_bytes()
    cut = tmp_path / "cut-000001.tar"
    cut.write_bytes(data[: len(data) // 2])
    s = inspect_shards([str(shapes_dir / "train-000000.tar"), str(cut)])
    assert s["unreadable_shards"] == [str(cut)]
    assert 10 < s["samples"] < 20 and s["unreadable_samples"] == 1  # the sample the cut went through
    assert any(str(cut) in p and "truncated" in p for p in s["problems"])


def test_cli_inspect(shapes_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["data", "inspect", str(shapes_dir / "train-000000.tar")])
    assert e.value.code == 0
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    with pytest.raises(SystemExit) as e:
        main(["data", "inspect", str(tmp_path / "junk.tar")])
    assert e.value.code == 1


def test_ambiguous_stems_and_pickled_npy_are_skipped(tmp_path: Path) -> None:
    """A stem with two images is skipped as one problem; an object .npy is refused, never unpickled."""
    for stem in ("a", "b"):
        _save(np.zeros((H, W, 3), np.uint8), tmp_path / "img" / f"{stem}.png")
    _save(np.zeros((H, W, 3), np.uint8), tmp_path / "img" / "a.jpg")
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth" / "a.npy", np.zeros((H, W), np.float32))
    np.save(tmp_path / "depth" / "b.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    report = pack_folder(tmp_path / "img", str(tmp_path / "o" / "s-%02d.tar"), depth=tmp_path / "depth")
    assert report.packed == 0 and report.shards == [] and not (tmp_path / "o").exists()
    assert [p.name for p in report.unpaired] == ["img/a.jpg, img/a.png, depth/a.npy"]
    assert [p.name for p in report.unreadable] == ["depth/b.npy"]
    assert "allow_pickle=False" in report.unreadable[0].reason


def test_val_fraction_and_imagefolder_metadata_jsonl(tmp_path: Path) -> None:
    """``--val-fraction``: a deterministic split by stem into val shards beside the training ones; ``--captions``
    takes the ``metadata.jsonl`` of a HF / diffusers ``imagefolder`` (``file_name`` + ``text``)."""
    from datamodules.pack import in_validation, val_pattern

    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    stems = [f"img{i:03d}" for i in range(40)]
    for s in stems:
        _save(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), root / f"{s}.png")
    lines = [json.dumps({"file_name": f"{s}.png", "text": f"photo {s}"}) for s in stems]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert val_pattern(str(tmp_path / "out" / "train-%06d.tar")) == str(tmp_path / "out" / "val-%06d.tar")
    assert val_pattern("shards/%04d.tar") == "shards/val-%04d.tar"
    report = pack_folder(root, str(tmp_path / "out" / "train-%06d.tar"), captions=tmp_path / "metadata.jsonl",
                         val_fraction=0.25)
    want_val = {s for s in stems if in_validation(s, 0.25)}
    assert 0 < len(want_val) < 20 and report.packed == 40 and report.val_packed == len(want_val)
    val_keys, train_keys = set(read_shard_members(report.val_shards)), set(read_shard_members(report.shards))
    assert val_keys == want_val and train_keys == set(stems) - want_val
    assert all(Path(s).name.startswith("val-") for s in report.val_shards)
    members = read_shard_members(report.shards)
    assert all(m["txt"].decode() == f"photo {k}" for k, m in members.items())
    with pytest.raises(ValueError, match=r"--val-fraction: expected a fraction in \[0, 1\), got 1.5"):
        pack_folder(root, str(tmp_path / "o2" / "train-%06d.tar"), val_fraction=1.5)
