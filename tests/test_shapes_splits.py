"""``mcm data shapes --test N``: a third split from its own seed stream, for the figures that are reported
(choices are made on ``val``).  Adding it changes no other split; no test image is a val image."""
from __future__ import annotations

import json
import tarfile

import numpy as np

from datamodules.shapes import make_sample
from mcm.cli.tool_commands import run_tool_command


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def test_the_test_split_is_its_own_and_changes_nothing_else(tmp_path):
    assert run_tool_command(["data", "shapes", "--out", str(tmp_path / "two"), "--train", "4", "--val", "6",
                             "--workers", "1"]) == 0
    assert run_tool_command(["data", "shapes", "--out", str(tmp_path / "three"), "--train", "4", "--val", "6",
                             "--test", "6", "--shard-size", "4", "--workers", "1"]) == 0
    three = tmp_path / "three"
    assert sorted(p.name for p in three.glob("test-*.tar")) == ["test-000000.tar", "test-000001.tar"]
    info = json.loads((three / "info.json").read_text())
    assert info["counts"] == {"train": 4, "val": 6, "test": 6}
    assert not list((tmp_path / "two").glob("test-*"))
    # val is byte for byte the val of a run without --test (one shard there, two of 4 + 2 here: compare samples)
    val_two = _members(tmp_path / "two" / "val-000000.tar")
    val_three = {**_members(three / "val-000000.tar"), **_members(three / "val-000001.tar")}
    assert val_two == val_three
    test = {**_members(three / "test-000000.tar"), **_members(three / "test-000001.tar")}
    assert len([k for k in test if k.endswith(".seg.png")]) == 6
    # its own stream: no test image equals a val image at any index
    for i in range(6):
        a, b = make_sample(0, i, 32, "test"), make_sample(0, i, 32, "val")
        assert not np.array_equal(a.image, b.image)
