#!/usr/bin/env bash
# Reproduces every figure and table in docs/results.md and docs/performance.md (run from the
# repository root after `pip install -e ".[dev]"`). Stages can run separately; the times are
# what they took here on 2 CPU cores (stages 2 and 3 ran two or three jobs at once).
set -euo pipefail

# 0. data: 2,000 training images in 4 shards of 500, 200 held-out images for choices (val) and 200 from their own
#    seed stream for the reported figures (test); seconds
mcm data shapes --out data/shapes --train 2000 --val 200 --test 200

# 1. the shipped multimodal MCM: the README main job's recipe run to 4,000 steps (~60 min on the idle machine),
#    exported as trained, its strength sweep, then the export that records the chosen strength (model card)
mcm fit -c experiments/shapes32/multimodal.yaml --trainer.max_steps 4000 --trainer.max_time null \
  --trainer.default_root_dir runs/shapes32_multimodal_4000 --trainer.logger.init_args.name shapes32_multimodal_4000
mcm export runs/shapes32_multimodal_4000/checkpoints/last.ckpt runs/shapes32_multimodal_4000/export   # as trained
docs/make_comparison.sh strength_sweep
mcm export runs/shapes32_multimodal_4000/checkpoints/last.ckpt mcm/weights/shapes32/mcm_multimodal --strength 2

# 2. every compared module at the shared 600-step budget (~15 min each with 2-3 jobs at once)
docs/train_comparison.sh compose_segmentation compose_sketch mcm_segmentation mcm_sketch \
  controlnet_segmentation controlnet_sketch controlnet_depth controlnet_partial_mask curve_250 curve_500 curve_1000

# 3. evaluations (64 held-out maps x 2 seeds, DDIM 25), the comparison table and the curve (val), then the shipped
#    modules on test: each map alone and all four at the recorded strength, composition, regional control
docs/make_comparison.sh
mcm evaluate --mcm mcm/weights/shapes32/mcm_multimodal --data "data/shapes/test-*.tar" --n 64 --seeds 0 1 --steps 25 \
  --per-modality --strength 1 STRENGTH --out docs/eval/test/shipped_multimodal
SPLIT=test docs/make_comparison.sh base compose regional

# 4. one grid per modality from the shipped module (held-out "test" layouts)
for m in segmentation sketch depth partial_mask; do
  mcm demo --modalities "$m" --n 8 --steps 50 --out "docs/img/mcm_${m}.png"
done
mcm demo --n 8 --steps 50 --out docs/img/mcm_all.png
mcm sample --mcm shapes32_compose_segmentation shapes32_compose_sketch --weights 2 2 \
  --data "data/shapes/val-*.tar" --n 8 --compare --out docs/img/compose_segmentation_sketch.png

# 5. cost, measured side by side in one process each (run on an otherwise idle machine)
python bench/train_step.py --quick --json docs/bench/train_step_quick.json
python bench/sample.py --quick --json docs/bench/sample_quick.json
python bench/data.py --quick --json docs/bench/data_quick.json
