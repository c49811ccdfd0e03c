"""Writes ``mcm predict`` results: one PNG per sample (base, MCM) and a grid per batch.

Grid rows: each condition's visualisation | base sample | MCM sample, same seed per column; tiles blown up
(nearest) to at least 128 px and each row labelled (:func:`mcm.pipelines.grids.labelled_grid`).  The
per-sample PNGs keep the model's resolution.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image

from mcm.pipelines.grids import comparison_labels, labelled_grid


# the files are named by sample key, never by dataset index: Lightning's batch indices (which only a plain
# DataLoader over a map-style dataset has) are not needed, so its warning that it cannot find them is noise
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader: "
                        r"`FixedLengthLoader`")


class SampleWriter(BasePredictionWriter):
    """Args:
        output_dir: where PNGs go (``<output_dir>/grid_<batch>.png``, ``<output_dir>/<key>_{base,mcm}.png``).
    """

    def __init__(self, output_dir: str = "outputs/predict"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        grid, keys = prediction["grid"], prediction["key"]
        n = len(keys)
        labels = comparison_labels(pl_module.trainable, prediction.get("modalities", []),
                                   getattr(pl_module.hparams, "val_strength", None))
        labelled_grid(grid, nrow=n, row_labels=labels).save(out / f"grid_{trainer.global_rank}_{batch_idx:04d}.png")
        base, mcm = grid[-2 * n:-n], grid[-n:]
        for i, k in enumerate(keys):
            save_image(base[i], out / f"{k}_base.png")
            save_image(mcm[i], out / f"{k}_mcm.png")
