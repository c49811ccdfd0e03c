#!/usr/bin/env bash
# Hard vs soft segmentation maps (issue "real-data path", item 6; docs/results.md "Soft maps"): two
# segmentation-only MCMs with the main job's min-SNR-5 recipe, 600 steps each, one trained on hard maps only
# and one with soft-map augmentation (soft_prob 0.5: half the training maps are one-hots blurred at the
# boundaries), each then measured from hard and from soft (sigma 1) held-out maps at strength 2
# (python -m mcm.evaluation.detail_levels: 32 maps, seed 0, DDIM 20, scored against the hard maps).
# Both ran at once on the 2 cores (1 thread each). Run from the repository root after
# `mcm data shapes --out data/shapes --train 2000 --val 200`:   docs/soft_maps_study.sh
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
  local v=$1 mods=$2 dir=runs/soft_$1
  mcm fit -c experiments/shapes32/segmentation.yaml --trainer.max_steps 600 --trainer.max_time 00:01:30:00 \
    --trainer.default_root_dir "$dir" --trainer.logger.init_args.name "soft_$v" --trainer.val_check_interval 600 \
    --model.init_args.loss_weighting min_snr --model.init_args.snr_gamma 5.0 \
    --data.init_args.modalities "$mods" > "runs/soft_$v.log" 2>&1
  mcm export "$dir/checkpoints/last.ckpt" "$dir/export"
  python -m mcm.evaluation.detail_levels --mcm "$dir/export" --data "data/shapes/val-*.tar" --n 32 --seeds 0 \
    --steps 20 --strength 2 --out "docs/eval/soft_maps_$v" >> "runs/soft_$v.log" 2>&1
}
mkdir -p runs
run hard '{"segmentation": {"num_classes": 6}}' &
run soft '{"segmentation": {"num_classes": 6, "soft_prob": 0.5}}' &
wait
cat docs/eval/soft_maps_hard/detail_levels.md docs/eval/soft_maps_soft/detail_levels.md
