"""Errors that keep their cause (docs/reliability.md): bad data is wrapped in ``ShardDecodeError`` (shard, key, field,
what was expected; the decoder's exception as ``__cause__``), skipped and counted; a bug in a plugin — any
exception other than a decode / validation error of the data — stops the run with its own type and traceback,
in the main process and from a data worker alike, and is never counted as a bad sample."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from datamodules import ShardDataModule
from datamodules.sample_decoding import BadSampleError, ShardDecodeError
from datamodules.shard_stream import ShardStream
from modalities import ModalityError
from modalities.segmentation import Segmentation
from shard_fixtures import plain_sample, png, write_tar


class AttributeBug(Segmentation):
    """A third-party plugin with a bug: its decoder reads an attribute it never set."""

    def decode(self, sample):
        return self.lookup_table[sample["seg.png"]]  # AttributeError


class UnicodeBug(Segmentation):
    """A plugin decoding a text field strictly; the old stream re-raised this as ``type(e)(msg)`` (a TypeError)."""

    def decode(self, sample):
        sample["txt"].decode("ascii")
        return super().decode(sample)


@pytest.fixture
def shard(tmp_path):
    members = [m for i in range(6) for m in plain_sample(f"k{i}", value=i % 6)]
    members[1] = ("k0.seg.png", b"\x89PNG\r\n\x1a\n not a png")  # k0: a corrupt seg map (bad data)
    members += [("k6.png", png(np.full((16, 16, 3), 90, np.uint8))), ("k6.seg.png", png(np.zeros((16, 16), np.uint8))),
                ("k6.txt", "caf\u00e9".encode())]  # k6: a non-ASCII caption
    return write_tar(tmp_path / "s-000.tar", members)


def _data(shard, plugin, workers: int) -> ShardDataModule:
    dm = ShardDataModule(val_shards=str(shard), modalities={"segmentation": {}}, image_size=16, batch_size=2,
                         num_workers=workers)
    dm.plugins = {"segmentation": plugin}
    return dm


def test_bad_data_is_wrapped_with_its_cause_and_named(shard):
    stream = ShardStream([str(shard)], {"segmentation": Segmentation()}, 16, 2, train=False)
    sample = {"__key__": "k0", "__url__": str(shard), "png": png(np.zeros((16, 16, 3), np.uint8)),
              "seg.png": b"\x89PNG\r\n\x1a\n not a png"}
    with pytest.raises(ShardDecodeError) as err:
        stream._decode(sample)
    e = err.value
    assert isinstance(e, BadSampleError) and isinstance(e, ValueError)
    assert isinstance(e.__cause__, ModalityError) and "not a readable image" in str(e.__cause__)
    assert (e.shard, e.key) == (str(shard), "k0") and e.field == "'seg.png' of modality 'segmentation'"
    assert "class ids 0..5" in e.expected
    msg = str(e)
    assert f"shard {shard}, sample 'k0', field 'seg.png' of modality 'segmentation'" in msg and "expected" in msg
    again = pickle.loads(pickle.dumps(e))  # crosses from a data worker intact
    assert type(again) is ShardDecodeError and str(again) == msg and again.field == e.field
    # the image itself
    with pytest.raises(ShardDecodeError, match=r"field 'png': 'png' is not a readable image.*expected an RGB"):
        stream._decode({**sample, "png": b"junk", "seg.png": png(np.zeros((16, 16), np.uint8))})


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_sample_skipped_and_counted(shard, workers, caplog):
    caplog.set_level(logging.WARNING, logger="datamodules")
    loader = _data(shard, Segmentation(), workers).val_dataloader()
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"k{i}" for i in range(1, 7)] and loader.skipped == 1
    if workers == 0:  # worker processes log to their own stderr
        assert any("sample 'k0', field 'seg.png'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_plugin_bug_stops_the_run_with_its_traceback(shard, workers, caplog):
    caplog.set_level(logging.WARNING, logger="datamodules")
    loader = _data(shard, AttributeBug(), workers).val_dataloader()
    with pytest.raises(AttributeError) as err:
        list(loader)
    text = str(err.value) + "".join(getattr(err.value, "__notes__", []))
    assert "lookup_table" in text, text
    assert "while decoding shard" in text and "sample 'k0'" in text and "modality 'segmentation'" in text, text
    if workers:  # the worker's traceback travels with it
        assert "in decode" in text and "test_bad_data.py" in text, text
    else:
        assert err.traceback[-1].name == "decode"  # raised where the bug is, not re-raised elsewhere
    assert loader.skipped == 0 and not any("skipping bad sample" in r.getMessage() for r in caplog.records)


def test_other_exception_types_keep_their_type(shard):
    """Regression: ``raise type(e)(msg)`` turned a UnicodeDecodeError into a TypeError (its constructor
    takes 5 arguments), and any exception was counted as bad data."""
    with pytest.raises(UnicodeDecodeError) as err:
        list(_data(shard, UnicodeBug(), 0).val_dataloader())
    assert "sample 'k6'" in "".join(err.value.__notes__)
