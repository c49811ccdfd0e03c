"""Which side of a sketch's outlines a pixel lies on: fixed (not learned) inside tests.

A sketch gives outlines; the image needs regions. Turning one into the other is a global operation
(is this pixel enclosed?) that a small conv encoder with a 5x5 receptive field cannot do and that the
MCM, trained from scratch, was measured not to learn in a 20-minute budget (docs/ablations.md, "Sketch
alone"). ControlNet gets it from the base's pretrained encoder. These classic tests hand the MCM
that evidence as extra input channels (``Sketch(region_hints=True)``); both are cheap, exact functions
of the strokes, so the same hint is computed at training and at sampling:

* :func:`enclosed`: flood fill from the image border through 4-connected non-stroke pixels; what the
  fill cannot reach is enclosed. Exact for closed outlines, blind to a shape whose outline is open
  (a gap, or a shape cut by the border).
* :func:`enclosed_open_border`: the same flood entering from only two adjacent sides, averaged over the four
  corners, so the border completes the outline of a shape it cuts (through one side or a corner).
* :func:`crossing_parity`: for each of the four ray directions, the parity of the number of stroke
  runs the ray crosses (the even-odd rule of polygon filling), averaged over the four rays. Robust to a
  gap or a border cut (only the rays through it vote wrong), noisy along strokes parallel to a ray.

On the 200 held-out shapes32 maps the foreground IoU of ``enclosed`` is 0.47, of ``crossing_parity >= 0.5``
0.64 and of ``enclosed_open_border >= 0.5`` 0.68 (``python -m mcm.evaluation.hint_accuracy``; what is left is
mostly background edges of the photo-like backdrop that close loops): evidence, not an answer; the encoder
learns how much to trust each next to the strokes themselves.

scipy's ``binary_fill_holes`` does the first test on the CPU per image; this one runs batched on the
tensors' device (training batches and CUDA sampling) with no host round trip. Cost on one CPU thread:
15 ms for a batch of 32 sketches at 32 px (~5% of a shapes32 main-job step); at 512 px 0.1 s for dense
strokes and 0.74 s for a single square (the flood needs about half the side in steps when strokes are
sparse), so SD-sized sketches want a GPU (not measured there). ``enclosed_open_border`` costs about 5x
``enclosed`` (four floods, each with farther to travel): ~40 ms per 32-px batch of 32
(7 ms for the other two, both timed while a training run shared the two cores).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F



def _dilate4(x: torch.Tensor) -> torch.Tensor:
    """4-connected (cross-shaped) dilation of ``(B, 1, H, W)`` in {0, 1}: 8-connected strokes stay barriers."""
    p = F.pad(x, (1, 1, 1, 1))
    return torch.stack([x, p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]]).amax(0)


#: the sides of the map a flood may enter from: top, bottom, left, right
SIDES = "tblr"


def _border_seeds(like: torch.Tensor, sides: str) -> torch.Tensor:
    seeds = torch.zeros_like(like)
    if "t" in sides:
        seeds[..., 0, :] = 1
    if "b" in sides:
        seeds[..., -1, :] = 1
    if "l" in sides:
        seeds[..., :, 0] = 1
    if "r" in sides:
        seeds[..., :, -1] = 1
    return seeds


@torch.no_grad()
def _unreached(strokes: torch.Tensor, seeds: torch.Tensor, check_every: int) -> torch.Tensor:
    """1 where a 4-connected flood from ``seeds`` through non-stroke pixels does not reach (strokes included).
    Iterates until the fill stops growing (checked every ``check_every`` steps: one host sync each); at most
    ``H * W`` steps (a spiral)."""
    free = (strokes < 0.5).to(strokes.dtype)
    reach = seeds * free
    h, w = strokes.shape[-2:]
    for _ in range(0, h * w, check_every):
        before = reach
        for _ in range(check_every):
            reach = _dilate4(reach) * free
        if torch.equal(before, reach):
            break
    return 1 - reach


@torch.no_grad()
def enclosed(strokes: torch.Tensor, check_every: int = 16) -> torch.Tensor:
    """``(B, 1, H, W)`` strokes in [0, 1] -> ``(B, 1, H, W)`` in {0, 1}: 1 where the flood fill from the whole
    border does not reach (strokes included)."""
    return _unreached(strokes, _border_seeds(strokes, SIDES), check_every)


@torch.no_grad()
def enclosed_open_border(strokes: torch.Tensor, check_every: int = 16) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, 1, H, W)`` in {0, 1/4, ..., 1}: :func:`enclosed` with the border read as a
    stroke on two adjacent sides, averaged over the four corners: the flood enters only from the other two
    sides, so a shape cut by one side or by a corner (whose outline the border completes) counts as enclosed
    in the one to two floods that do not enter through its cut, and a pixel the whole-border flood cannot reach
    has 1.  The four floods run as one batch."""
    b = strokes.shape[0]
    seeds = torch.cat([_border_seeds(strokes, sides) for sides in ("br", "bl", "tr", "tl")])
    fills = _unreached(strokes.repeat(4, 1, 1, 1), seeds, check_every)
    return fills.reshape(4, b, *strokes.shape[1:]).mean(0)


def _runs_before(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Number of stroke runs at or before each pixel along ``dim`` (towards index 0); off strokes, the runs
    a ray from the pixel towards index 0 crosses."""
    prev = torch.cat([torch.zeros_like(s.narrow(dim, 0, 1)), s.narrow(dim, 0, s.shape[dim] - 1)], dim)
    starts = (s & ~prev).to(torch.int32)
    return starts.cumsum(dim)


@torch.no_grad()
def crossing_parity(strokes: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` strokes in [0, 1] -> ``(B, 1, H, W)`` in {0, 1/4, ..., 1}: the fraction of the four
    axis-aligned rays from each pixel that cross an odd number of stroke runs (1 on strokes)."""
    s = strokes >= 0.5
    votes = []
    for dim in (-1, -2):
        votes.append(_runs_before(s, dim) % 2)
        votes.append(_runs_before(s.flip(dim), dim).flip(dim) % 2)
    v = torch.stack(votes).to(strokes.dtype).mean(0)
    return torch.maximum(v, s.to(strokes.dtype))


#: the hints ``Sketch(region_hints=...)`` may name, in the order given; ``region_hints: true`` is the first two
HINTS = {"enclosed": enclosed, "crossing_parity": crossing_parity, "enclosed_open_border": enclosed_open_border}
DEFAULT_HINTS = ("enclosed", "crossing_parity")


def region_hints(strokes: torch.Tensor, names: tuple[str, ...] = DEFAULT_HINTS) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, len(names), H, W)``: the named hints of :data:`HINTS`, in that order."""
    return torch.cat([HINTS[n](strokes) for n in names], dim=1)
