"""``ShardDataModule`` / ``ShardStream``: exact counts, alignment, rank split, bad data, safety (docs/concepts.md#data-and-shard-keys).

Shards are tiny (``shapes`` 32x32, or hand-made 16x16 ones from ``shard_fixtures``) and
everything runs in the main process except the one ``num_workers=2`` check.
"""
from __future__ import annotations

import logging
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datamodules.shard_stream as shard_stream
from datamodules import ShardDataModule, write_shapes_shards
from datamodules.shard_datamodule import count_samples, expand_shards
from datamodules.shard_stream import ShardStream, assign_shards
from shard_fixtures import (
    FAR, NEAR, SQUARE_ID, member_offsets, plain_sample, png, sample_members, square_scene, truncate, write_tar,
)

ALL_MODALITIES = {"segmentation": {"num_classes": 6}, "sketch": {}, "depth": {}, "partial_mask": {"num_classes": 6}}
BATCH_KEYS = {"image", "segmentation", "sketch", "depth", "partial_mask", "caption", "key", "skipped", "class_label"}


def fake_rank(dm: ShardDataModule, rank: int, world: int, epoch: int = 0) -> ShardDataModule:
    """Attach what ``ShardDataModule`` reads from a Trainer (global_rank, world_size, current_epoch)."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    return dm


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def skipped_of(batches: list[dict]) -> int:
    return sum(int(b["skipped"]) for b in batches)


# ---- 1. the shapes dataset through the DataModule ----------------------------------------------

@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(out, train=64, val=16, size=32, shard_size=16, workers=1)
    return out


def test_shapes_round_trip_train(shapes_dir):
    dm = ShardDataModule(train_shards=str(shapes_dir / "train-*.tar"), val_shards=str(shapes_dir / "val-*.tar"),
                         modalities=ALL_MODALITIES, batch_size=8, num_workers=0)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 64 // 8 and len(batches) == 64 // 8
    for b in batches:
        assert set(b) == BATCH_KEYS
        img, seg, depth, sketch, partial = b["image"], b["segmentation"], b["depth"], b["sketch"], b["partial_mask"]
        assert img.dtype == torch.float32 and img.shape == (8, 3, 32, 32)
        assert -1.0 <= img.min() and img.max() <= 1.0
        assert seg.dtype == torch.int64 and seg.shape == (8, 32, 32)
        assert set(seg.unique().tolist()) <= set(range(6))  # the fixed shapes classes only
        assert depth.dtype == torch.float32 and depth.shape == (8, 1, 32, 32)
        assert 0.0 <= depth.min() and depth.max() <= 1.0
        assert sketch.dtype == torch.float32 and sketch.shape == (8, 1, 32, 32)
        assert 0.0 <= sketch.min() and sketch.max() <= 1.0
        assert partial.dtype == torch.int64 and partial.shape == (8, 32, 32)
        assert set(partial.unique().tolist()) <= set(range(6)) | {255}
        assert len(b["caption"]) == 8 and all(isinstance(c, str) and c for c in b["caption"])
        assert all(k.startswith("train_") for k in b["key"])
        assert int(b["skipped"]) == 0
    # every class and the unknown label show up somewhere in 64 samples
    assert set(torch.cat([b["segmentation"] for b in batches]).unique().tolist()) == set(range(6))
    assert 255 in torch.cat([b["partial_mask"] for b in batches]).unique().tolist()
    # the sketch is derived (no sketch.png in shapes shards) and has strokes
    assert all(b["sketch"].sum() > 0 for b in batches)


def test_shapes_val_is_complete_and_deterministic(shapes_dir):
    dm = ShardDataModule(train_shards=str(shapes_dir / "train-*.tar"), val_shards=str(shapes_dir / "val-*.tar"),
                         modalities=ALL_MODALITIES, batch_size=8, num_workers=0)
    loader = dm.val_dataloader()
    first, second = list(loader), list(loader)
    assert len(loader) == 2 and len(first) == 2
    assert keys_of(first) == [f"val_{i:08d}" for i in range(16)]  # shard order, each key once
    for a, b in zip(first, second):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        for name in ("image", "segmentation", "sketch", "depth", "partial_mask"):
            assert torch.equal(a[name], b[name]), name
    # the class label (for class-conditional bases): the class covering the most pixels of the full map
    for b in first:
        for seg, label in zip(b["segmentation"], b["class_label"]):
            counts = torch.bincount(seg.flatten(), minlength=6)[1:]
            assert int(label) == (int(counts.argmax()) + 1 if counts.any() else 0)
    # val partial masks hide regions (deterministically per key)
    assert 255 in torch.cat([b["partial_mask"] for b in first]).unique().tolist()


# ---- 2. joint geometric augmentation keeps every map on the image -------------------------------

@pytest.mark.parametrize("hflip,crop_scale", [(1.0, (1.0, 1.0)), (0.0, (0.5, 0.6)), (1.0, (0.5, 0.6))])
def test_geometric_augmentation_keeps_maps_aligned(tmp_path, hflip, crop_scale):
    """Regression: label maps were resized with torch's legacy "nearest" (floor(i * in/out)), half an
    output pixel off the bilinear image; per-sample IoU of the crop cases fell to 0.87."""
    image, seg, depth = square_scene(32)  # red square (id 2, near) on the LEFT half, grey far background
    members = [m for i in range(16) for m in sample_members(f"s{i:02d}", image, seg, depth)]
    write_tar(tmp_path / "scene.tar", members)
    torch.manual_seed(0)  # the crop parameters come from torch's global RNG
    dm = ShardDataModule(train_shards=str(tmp_path / "scene.tar"), modalities={"segmentation": {}, "depth": {}},
                         batch_size=8, num_workers=0, hflip=hflip, crop_scale=crop_scale)
    batches = list(dm.train_dataloader())
    img = torch.cat([b["image"] for b in batches])  # (16, 3, 32, 32) in [-1, 1]
    labels = torch.cat([b["segmentation"] for b in batches])  # (16, 32, 32)
    dep = torch.cat([b["depth"] for b in batches])[:, 0]  # (16, 32, 32)
    assert img.shape == (16, 3, 32, 32) and labels.shape == (16, 32, 32)

    # labels stay labels: only values of the source map, no blends such as 1 between 0 and 2
    assert set(labels.unique().tolist()) == {0, SQUARE_ID}
    red = (img[:, 0] - img[:, 1]) > 1.0  # red - green above half its range (1 - (-1)) / 2
    square = labels == SQUARE_ID
    for i in range(16):
        iou = (red[i] & square[i]).sum() / (red[i] | square[i]).sum()
        assert iou > 0.98, f"sample {i}: IoU of red pixels and seg=={SQUARE_ID} is {iou:.3f}"
    # depth follows: near on the square, far elsewhere (bilinear edges and depth jitter aside)
    assert (dep[square] < (NEAR + FAR) / 2).float().mean() > 0.95
    assert (dep[~square] > (NEAR + FAR) / 2).float().mean() > 0.95
    # which half the square is on says whether the flip happened
    xs = torch.arange(32, dtype=torch.float32)
    centroid_x = (square.float() * xs).sum((1, 2)) / square.float().sum((1, 2))
    if hflip == 1.0:
        assert (centroid_x > 16).all(), centroid_x
    else:
        assert (centroid_x < 16).all(), centroid_x
    if crop_scale == (1.0, 1.0):  # the whole image, mirrored exactly
        expected = torch.from_numpy(seg.astype(np.int64)).flip(-1)
        assert all(torch.equal(labels[i], expected) for i in range(16))


def test_eval_resize_keeps_maps_aligned(tmp_path):
    """32 -> 22 (no edge of the square lands on a half pixel): labels match the red pixels exactly;
    legacy "nearest" put label edges one pixel off (IoU 0.94)."""
    image, seg, depth = square_scene(32)
    write_tar(tmp_path / "scene.tar", [m for i in range(4) for m in sample_members(f"s{i}", image, seg, depth)])
    dm = ShardDataModule(val_shards=str(tmp_path / "scene.tar"), modalities={"segmentation": {}, "depth": {}},
                         image_size=22, batch_size=4, num_workers=0)
    (batch,) = list(dm.val_dataloader())
    labels, img = batch["segmentation"], batch["image"]
    assert labels.shape == (4, 22, 22) and img.shape == (4, 3, 22, 22)
    assert set(labels.unique().tolist()) == {0, SQUARE_ID}
    assert torch.equal((img[:, 0] - img[:, 1]) > 1.0, labels == SQUARE_ID)


# ---- 3. ranks and workers --------------------------------------------------------------------

SIZES = (16, 16, 8, 24)  # uneven on purpose


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> tuple[str, dict[str, set[str]]]:
    root = tmp_path_factory.mktemp("uneven")
    keys: dict[str, set[str]] = {}
    for s, n in enumerate(SIZES):
        path = root / f"part-{s}.tar"
        write_tar(path, [m for i in range(n) for m in plain_sample(f"p{s}_{i:02d}", value=s)])
        keys[str(path)] = {f"p{s}_{i:02d}" for i in range(n)}
    return str(root / "part-*.tar"), keys


def _rank_batches(spec: str, rank: int, num_workers: int) -> tuple[int, list[dict]]:
    dm = fake_rank(ShardDataModule(train_shards=spec, modalities={"segmentation": {}}, image_size=16,
                                   batch_size=8, num_workers=num_workers, train_samples=64, shuffle_buffer=16), rank, 2)
    loader = dm.train_dataloader()
    return len(loader), list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_see_disjoint_samples_and_equal_batches(uneven_shards, num_workers):
    spec, shard_keys = uneven_shards
    (len0, b0), (len1, b1) = _rank_batches(spec, 0, num_workers), _rank_batches(spec, 1, num_workers)
    assert len0 == len1 == 64 // (8 * 2)
    assert len(b0) == len(b1) == 4  # exactly len(loader), though rank 0 holds 24 samples and rank 1 holds 40
    assert all(len(b["key"]) == 8 and b["segmentation"].shape == (8, 16, 16) for b in b0 + b1)
    k0, k1 = set(keys_of(b0)), set(keys_of(b1))
    assert not k0 & k1
    urls = sorted(shard_keys)
    if num_workers == 0:  # 4 shards, 2 readers: rank r reads shards r and r + 2
        assert k0 <= shard_keys[urls[0]] | shard_keys[urls[2]]
        assert k1 <= shard_keys[urls[1]] | shard_keys[urls[3]]
    else:  # 4 shards, 4 readers: one shard each
        assert k0 <= shard_keys[urls[0]] | shard_keys[urls[1]]
        assert k1 <= shard_keys[urls[2]] | shard_keys[urls[3]]


def _pass_samples(urls: list[str], sizes: dict[str, int], rank: int, world: int, worker: int,
                  workers: int) -> list[tuple[str, int]]:
    """The (shard, index) samples reader (rank, worker) keeps from one unshuffled pass over its shards."""
    shards, stride, offset = assign_shards(urls, rank, world, worker, workers)
    stream = [(u, j) for u in shards for j in range(sizes[u])]
    return stream[offset::stride]


@pytest.mark.parametrize("n_urls,world,workers", [(3, 2, 2), (2, 4, 1), (1, 2, 2), (5, 2, 2), (8, 2, 2), (2, 1, 3)])
def test_assign_shards_never_leaves_a_reader_empty(n_urls, world, workers):
    urls = [f"s{i}.tar" for i in range(n_urls)]
    sizes = {u: 5 + 2 * i for i, u in enumerate(urls)}  # uneven and odd
    seen: Counter = Counter()
    for rank in range(world):
        for worker in range(workers):
            shards, stride, offset = assign_shards(urls, rank, world, worker, workers)
            assert shards and 0 <= offset < stride, (rank, worker, shards, stride, offset)
            got = _pass_samples(urls, sizes, rank, world, worker, workers)
            assert got, (rank, worker)
            seen.update(got)
    # together the readers keep every sample of a pass exactly once
    assert seen == Counter({(u, j): 1 for u in urls for j in range(sizes[u])})


@pytest.mark.parametrize("sizes,world,workers", [((5, 7, 3), 1, 4), ((5, 7), 4, 1), ((5, 7, 3), 2, 2)])
def test_fallback_split_of_a_shuffled_stream_is_disjoint(tmp_path, monkeypatch, sizes, world, workers):
    """Regression: readers sharing shards (fewer shards than readers) shuffled the shard order with
    their own (rank, worker) seed, so ``i % stride == offset`` picked overlapping samples."""
    urls, keys = [], {}
    for s, n in enumerate(sizes):
        path = write_tar(tmp_path / f"f-{s}.tar", [m for i in range(n) for m in plain_sample(f"f{s}_{i}")])
        urls.append(str(path))
        keys[str(path)] = [f"f{s}_{i}" for i in range(n)]
    seen: Counter = Counter()
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setattr(shard_stream, "get_worker_info",
                                lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
            n = len(_pass_samples(urls, {u: len(k) for u, k in keys.items()}, rank, world, worker, workers))
            stream = iter(ShardStream(urls, {}, 16, 1, train=True, seed=3, shuffle_buffer=0, rank=rank,
                                      world_size=world))
            seen.update(next(stream)["key"][0] for _ in range(n))
    assert seen == Counter({k: 1 for ks in keys.values() for k in ks})


# ---- 4. bad data ---------------------------------------------------------------------------

@pytest.fixture
def bad_shards(tmp_path) -> Path:
    """``a-trunc.tar``: 4 good samples, then cut in the middle of ``b04.seg.png``;
    ``b-bad.tar``: 12 good samples and 3 bad ones (unreadable png, no seg.png, seg of the wrong size)."""
    trunc = write_tar(tmp_path / "a-trunc.tar", [m for i in range(8) for m in plain_sample(f"b{i:02d}")])
    start, end = member_offsets(trunc)["b04.seg.png"]
    truncate(trunc, (start + end) // 2)
    img, dep = np.full((16, 16, 3), 90, np.uint8), np.zeros((16, 16), np.uint16)
    members = plain_sample("c00")
    members += [("c01.png", b"\x89PNG not really"), ("c01.seg.png", png(np.zeros((16, 16), np.uint8))),
                ("c01.txt", b"unreadable image")]
    members += plain_sample("c02")
    members += sample_members("c03", img, None, dep)  # no seg.png
    members += sample_members("c04", img, np.zeros((16, 14), np.uint8), dep)  # seg 16x14, image 16x16
    for i in range(5, 15):
        members += plain_sample(f"c{i:02d}")
    write_tar(tmp_path / "b-bad.tar", members)
    return tmp_path


GOOD_KEYS = [f"b{i:02d}" for i in range(4)] + ["c00", "c02"] + [f"c{i:02d}" for i in range(5, 15)]


def _bad_data_module(root: Path, **kw) -> ShardDataModule:
    return ShardDataModule(val_shards=str(root / "*.tar"), modalities={"segmentation": {}}, image_size=16,
                           batch_size=4, num_workers=0, val_samples=16, **kw)


def test_bad_samples_are_skipped_counted_and_named(bad_shards, caplog):
    """Regression: one truncated shard counted as 3 bad samples (webdataset's member read error, its
    re-raise on the next header, then the cut sample); it now counts once, as the cut sample."""
    caplog.set_level(logging.WARNING, logger="datamodules")
    dm = _bad_data_module(bad_shards)
    loader = dm.val_dataloader()
    batches = list(loader)
    # the length counts the 20 samples the shards' headers hold (5 batches); 4 are bad: 16 good in 4 batches
    assert len(loader) == 5 and len(batches) == 4
    assert keys_of(batches) == GOOD_KEYS  # one pass: every good sample once, in shard order
    assert skipped_of(batches) == 4  # 1 cut sample + 3 bad ones
    assert loader.skipped == 4 and dm.skipped_samples() == 4
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "a-trunc.tar" in text and "'b04'" in text
    for key in ("c01", "c03", "c04"):
        assert any("b-bad.tar" in r.getMessage() and f"'{key}'" in r.getMessage() for r in caplog.records), key
    assert "not a readable image" in text and "(16, 14)" in text and "seg.png" in text


def test_too_many_bad_samples_stop_the_run(bad_shards):
    dm = _bad_data_module(bad_shards, max_bad_fraction=0.1)
    loader = dm.val_dataloader()
    loader.min_seen = 8  # default 200; reached at the second batch here: 8 good + 4 bad seen
    with pytest.raises(RuntimeError, match=r"4 of 12 samples were bad \(33\.3%\).*max_bad_fraction=10\.0%") as err:
        list(loader)
    assert "data.max_bad_fraction" in str(err.value) and loader.seen == 8 and loader.skipped == 4
    # below min_seen nothing is raised, whatever the fraction
    loose = _bad_data_module(bad_shards, max_bad_fraction=0.1).val_dataloader()
    assert loose.min_seen == 200 and len(list(loose)) == 4


def test_truncated_shard_still_counts_what_it_has(bad_shards):
    """Regression: ``count_samples`` counted 0 for a truncated shard (getmembers raised before adding)."""
    assert count_samples([str(bad_shards / "a-trunc.tar")], "val_shards") == 5  # b00..b04 (b04 cut)
    assert count_samples([str(bad_shards / "b-bad.tar")], "val_shards") == 15


def test_missing_or_empty_shard_lists_are_named(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        expand_shards([], "train_shards")
    with pytest.raises(ValueError, match="train_shards is not set"):
        ShardDataModule(train_shards=None, num_workers=0).train_dataloader()
    missing = tmp_path / "nope-{000..001}.tar"
    with pytest.raises(FileNotFoundError, match=r"train_shards: 2 of 2 shards do not exist.*nope-000\.tar"):
        ShardDataModule(train_shards=str(missing), num_workers=0).train_dataloader()
    with pytest.raises(FileNotFoundError, match=r"val_shards: 1 of 1 .*nothing-\*\.tar"):
        ShardDataModule(val_shards=str(tmp_path / "nothing-*.tar"), num_workers=0).val_dataloader()


# ---- 5. safety: nothing is unpickled ---------------------------------------------------------------

class _CreatesFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    target = tmp_path / "pwned.txt"
    payload = pickle.dumps(_CreatesFile(str(target)))
    pickle.loads(payload).close()  # the payload does what it says when unpickled: the test can bite
    assert target.exists()
    target.unlink()
    members = []
    for i in range(8):
        members += plain_sample(f"k{i}")
        members += [(f"k{i}.pyd", payload), (f"k{i}.pickle", payload), (f"k{i}.seg.pth", payload)]
    write_tar(tmp_path / "evil.tar", members)
    dm = ShardDataModule(val_shards=str(tmp_path / "evil.tar"), modalities={"segmentation": {}, "depth": {}},
                         image_size=16, batch_size=4, num_workers=0)
    batches = list(dm.val_dataloader())
    assert keys_of(batches) == [f"k{i}" for i in range(8)] and skipped_of(batches) == 0
    assert not any(set(b) & {"pyd", "pickle", "seg.pth"} for b in batches)
    assert not target.exists()


# ---- 6. only what the configured modalities need is read --------------------------------------------

def test_captions_only_does_not_need_seg(tmp_path):
    img = np.full((16, 16, 3), 90, np.uint8)
    members = [m for i in range(3) for m in plain_sample(f"w{i}")]
    members += sample_members("w3", img, caption="no maps at all")  # image + caption, no seg/depth
    write_tar(tmp_path / "few.tar", members)
    batches = list(ShardDataModule(val_shards=str(tmp_path / "few.tar"), modalities={}, image_size=16,
                                   batch_size=4, num_workers=0).val_dataloader())
    assert len(batches) == 1 and keys_of(batches) == ["w0", "w1", "w2", "w3"] and skipped_of(batches) == 0
    assert set(batches[0]) == {"image", "caption", "key", "skipped"}
    assert batches[0]["caption"][3] == "no maps at all"
    # the same shard with segmentation configured skips exactly that sample; nothing repeats to fill the batch
    dm = ShardDataModule(val_shards=str(tmp_path / "few.tar"), modalities={"segmentation": {}}, image_size=16,
                         batch_size=4, num_workers=0)
    batches = list(dm.val_dataloader())
    assert keys_of(batches) == ["w0", "w1", "w2"] and skipped_of(batches) == 1


def test_the_stream_stages_work_alone():
    """``ShardStream`` is a webdataset ``DataPipeline`` of stages, each testable alone: every n-th sample, decoding
    that skips and counts bad data, batching that carries the skip counts (evaluation: the last batch too)."""
    from datamodules.sample_decoding import BadSampleError, SkipCounter
    from datamodules.shard_stream import batched, decoded, every_nth

    assert list(every_nth(3, 1)(iter(range(10)))) == [1, 4, 7]
    assert list(every_nth(1, 0)(iter(range(3)))) == [0, 1, 2]
    counter = SkipCounter()

    def decode(s):
        if s["i"] % 4 == 3:
            raise BadSampleError(f"sample {s['i']} is bad")
        return {"key": str(s["i"]), "x": torch.tensor([float(s["i"])])}

    items = list(decoded(decode, counter)(iter({"i": i} for i in range(10))))
    assert [it["key"] for it in items] == ["0", "1", "2", "4", "5", "6", "8", "9"] and counter.count == 2
    with pytest.raises(KeyError):  # a bug is never counted as bad data
        list(decoded(lambda s: s["missing"], SkipCounter())(iter([{}])))
    counter = SkipCounter()
    counter(BadSampleError("one"))
    evaluation = list(batched(3, counter, False, ["s.tar"])(iter(items)))
    assert [len(b["key"]) for b in evaluation] == [3, 3, 2]  # the last partial batch, no padding
    assert [int(b["skipped"]) for b in evaluation] == [1, 0, 0]
    training = list(batched(3, SkipCounter(), True, ["s.tar"])(iter(items)))
    assert [len(b["key"]) for b in training] == [3, 3]  # full batches only
