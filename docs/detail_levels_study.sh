#!/usr/bin/env bash
# Sketches at three levels of detail (issue "real-data path", item 6; docs/results.md "Sketch detail levels"):
# two sketch-only MCMs with region hints and min-SNR-5, 600 steps each (docs/sketch_study.sh), one trained on
# the default Canny pair only and one over three pairs drawn per sample (detail_levels: sparse 0.45/0.9,
# default 0.3/0.6, dense 0.15/0.3), each measured from held-out sketches drawn at each pair
# (python -m mcm.evaluation.detail_levels: 32 maps, seed 0, DDIM 20, strength 3, edges of the samples
# detected at the same pair). Run from the repository root after
# `mcm data shapes --out data/shapes --train 2000 --val 200`:   docs/detail_levels_study.sh
set -euo pipefail
docs/sketch_study.sh regions_min_snr regions_levels
for v in regions_min_snr regions_levels; do
  python -m mcm.evaluation.detail_levels --mcm "runs/sk_$v/export" --data "data/shapes/val-*.tar" --n 32 \
    --seeds 0 --steps 20 --strength 3 --out "docs/eval/detail_levels_$v" > "runs/detail_levels_$v.log" 2>&1
  cat "docs/eval/detail_levels_$v/detail_levels.md"
done
