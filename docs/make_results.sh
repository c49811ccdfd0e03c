#!/usr/bin/env bash
# Reproduces every figure and table in docs/results.md (run from the repository root).
# Needs: pip install -e ".[dev]" and about 15 minutes of 2 CPU cores for the evaluation part.
set -euo pipefail

# 0. held-out data (the val split is never trained on)
mcm data shapes --out data/shapes --train 2000 --val 200

# 1. one grid per modality from the shipped multimodal MCM (held-out "test" layouts),
#    rows: condition(s) | base alone | base + MCM, same seeds per column
mkdir -p docs/img
for m in segmentation sketch depth partial_mask; do
  mcm demo --modalities "$m" --n 8 --steps 50 --out "docs/img/mcm_${m}.png"
done
mcm demo --n 8 --steps 50 --out docs/img/mcm_all.png

# 2. alignment and quality: base alone vs the shipped MCM, each modality alone and all four
mcm evaluate --mcm shapes32 --data "data/shapes/val-*.tar" --n 64 --seeds 0 --steps 25 \
  --per-modality --strength 0.5 1.0 --out docs/eval/mcm_shapes32
mcm evaluate --data "data/shapes/val-*.tar" --n 64 --seeds 0 --steps 25 --out docs/eval/base_shapes32

# 3. cost: MCM training step vs one no-grad base forward, peak memory vs base inference
python bench/train_step.py --quick --models shapes32 --json docs/eval/train_step_shapes32.json
