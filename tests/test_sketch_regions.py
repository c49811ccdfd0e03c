"""The sketch plugin's region hints (modalities/sketch_regions.py): the two inside tests, computed by hand."""
import pytest
import torch

import modalities
from mcm.models.modulator import MultimodalConditioningModule
from modalities.sketch_regions import crossing_parity, enclosed, enclosed_open_border


def _square(gap: bool = False, size: int = 16) -> torch.Tensor:
    """Outline of the square rows / columns 4..11 in a 16x16 map, optionally with a 1-pixel gap on its left."""
    x = torch.zeros(1, 1, size, size)
    x[..., 4, 4:12] = x[..., 11, 4:12] = 1
    x[..., 4:12, 4] = x[..., 4:12, 11] = 1
    if gap:
        x[..., 7, 4] = 0
    return x


def test_enclosed_fills_a_closed_outline_and_not_an_open_one():
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True  # outline and interior
    assert torch.equal(enclosed(_square())[0, 0] > 0.5, inside)
    # one missing pixel: the border's flood reaches the interior, only the strokes stay
    assert torch.equal(enclosed(_square(gap=True))[0, 0], _square(gap=True)[0, 0])


def test_enclosed_needs_4_connected_gaps_to_leak():
    # a diagonal (8-connected) outline is closed for a 4-connected flood
    x = torch.zeros(1, 1, 9, 9)
    for i in range(4):
        x[..., 4 - i, i + 1] = x[..., 4 + i, i + 1] = x[..., 4 - i, 7 - i] = x[..., 4 + i, 7 - i] = 1
    e = enclosed(x)[0, 0]
    assert e[4, 4] == 1 and e[0, 0] == 0


def test_crossing_parity_votes_per_ray():
    p = crossing_parity(_square())[0, 0]
    assert torch.all(p[5:11, 5:11] == 1) and p[0, 0] == 0 and p[7, 1] == 0
    # outside, right of the square: the ray to the left crosses two runs (even), the others none
    assert p[7, 14] == 0
    # with a gap in the left side, the pixels of row 7 inside lose exactly one vote (the ray through the gap)
    g = crossing_parity(_square(gap=True))[0, 0]
    assert torch.all(g[7, 5:11] == 0.75) and torch.all(g[8, 5:11] == 1)


def test_enclosed_open_border_counts_a_shape_the_border_cuts():
    # an "L" of strokes cutting off the top-left corner: rows 0..5 x cols 0..5 are closed by the border only
    x = torch.zeros(1, 1, 16, 16)
    x[..., 6, 0:7] = x[..., 0:7, 6] = 1
    assert enclosed(x)[0, 0, 2, 2] == 0  # the whole-border flood enters the corner
    o = enclosed_open_border(x)[0, 0]
    # of the floods from (bottom, right), (bottom, left), (top, right), (top, left) only the first leaves it dry
    assert o[2, 2] == 0.25 and o[12, 12] == 0 and o[6, 3] == 1  # a stroke is 1
    # a square cut by the left side: the floods from (bottom, right) and (top, right) do not enter it
    y = torch.zeros(1, 1, 16, 16)
    y[..., 4, 0:8] = y[..., 11, 0:8] = 1
    y[..., 4:12, 7] = 1
    assert enclosed_open_border(y)[0, 0, 7, 3] == 0.5 and enclosed_open_border(y)[0, 0, 1, 1] == 0
    # a closed outline inside the map: no flood reaches its interior
    assert torch.all(enclosed_open_border(_square())[0, 0, 5:11, 5:11] == 1)
    # batched: each map gets its own fills
    assert torch.equal(enclosed_open_border(torch.cat([x, y]))[1], enclosed_open_border(y)[0])


def test_plugin_option_names_its_hints():
    named = modalities.create("sketch", region_hints=["enclosed_open_border", "crossing_parity"])
    assert named.channels == 3 and named.config()["region_hints"] == ["enclosed_open_border", "crossing_parity"]
    x = _square().expand(2, 1, 16, 16)
    c = named.to_channels(x)
    assert torch.equal(c[:, 1:2], enclosed_open_border(x)) and torch.equal(c[:, 2:], crossing_parity(x))
    assert modalities.create("sketch", **named.config()).channels == 3


def test_plugin_option_adds_two_channels_and_round_trips():
    plain, hinted = modalities.create("sketch"), modalities.create("sketch", region_hints=True)
    assert (plain.channels, hinted.channels, hinted.raw_channels) == (1, 3, 1)
    x = _square().expand(2, 1, 16, 16)
    c = hinted.to_channels(x)
    assert torch.equal(c[:, :1], x) and torch.equal(c[:, 1:2], enclosed(x))
    assert torch.equal(c[:, 2:], crossing_parity(x))
    assert modalities.create("sketch", **hinted.config()).region_hints
    for bad in ("no", [], ["enclosed", "enclosed"], ["inside"], [{"enclosed": 1}]):
        with pytest.raises(ValueError, match=r"region_hints must be true, false or a list of distinct hint names"):
            modalities.create("sketch", region_hints=bad)
    # an MCM built with the option takes 1-channel sketches and starts as an exact no-op
    mcm = MultimodalConditioningModule(latent_channels=3, modalities={"sketch": {"region_hints": True}},
                                       block_out_channels=(32, 32), attention_levels=())
    gamma, beta = mcm(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), {"sketch": x})
    assert gamma.abs().max() == 0 and beta.abs().max() == 0


def test_the_app_draws_a_hinted_sketch_as_strokes():
    # the canvas is of the raw map (1 channel), not of the 3 channels the encoder is fed
    from mcm.cli.app_maps import canvas_spec

    spec = canvas_spec("sketch", modalities.create("sketch", region_hints=True))
    assert spec.kind == "continuous" and spec.binary
