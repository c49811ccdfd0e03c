"""mcm.evaluation.sketch_by_hint: the hint's foreground IoU and the banding, computed by hand."""
import numpy as np
import torch

from mcm.evaluation.sketch_by_hint import band_rows, hint_iou


def test_hint_iou_of_a_closed_square_against_its_own_and_a_shifted_foreground():
    sketch = torch.zeros(2, 1, 16, 16)
    sketch[:, :, 4, 4:12] = sketch[:, :, 11, 4:12] = 1
    sketch[:, :, 4:12, 4] = sketch[:, :, 4:12, 11] = 1
    seg = torch.zeros(2, 16, 16, dtype=torch.long)
    seg[0, 4:12, 4:12] = 3  # the square itself: the hint (outline + inside) matches it exactly
    seg[1, 4:12, 8:16] = 1  # half of it: 32 shared pixels of 64 + 64 - 32
    assert np.allclose(hint_iou(sketch, seg), [1.0, 32 / 96])


def test_band_rows_average_each_setting_within_its_band_and_skip_empty_bands():
    iou = np.array([0.1, 0.9, 0.95, 1.0])
    f1 = {"a": np.array([0.2, 0.4, 0.6, 0.8]), "b": np.array([1.0, 0.0, 0.0, 0.3])}
    rows = band_rows(iou, f1)
    assert rows == [{"band": "[0, 0.5)", "n": 1, "a": 0.2, "b": 1.0},
                    {"band": "[0.8, 1]", "n": 3, "a": 0.6, "b": 0.1}]
