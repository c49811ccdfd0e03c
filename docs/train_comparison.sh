#!/usr/bin/env bash
# Trains every module compared in docs/results.md, at one shared budget of STEPS optimizer steps
# (same base, data, batch 32, seeds). Run from the repository root after
#   mcm data shapes --out data/shapes --train 2000 --val 200
# Usage: docs/train_comparison.sh [JOB ...]   (no argument: every job, in order; or run jobs in
# two shells at once, e.g. `docs/train_comparison.sh compose_segmentation compose_sketch`).
# Each job trains, then exports runs/<job>/export (what mcm evaluate / mcm sample load).
set -euo pipefail
STEPS=${STEPS:-600}

fit() {  # fit NAME EXPERIMENT [extra overrides...]
  local name=$1 exp=$2; shift 2
  if [[ -f runs/$name/export/config.json ]]; then echo "skip $name (exported)"; return; fi
  mcm fit -c "experiments/shapes32/$exp.yaml" --trainer.max_steps "$STEPS" --trainer.max_time null \
    --trainer.default_root_dir "runs/$name" "$@" > "runs/$name.log" 2>&1
  mcm export "runs/$name/checkpoints/last.ckpt" "runs/$name/export"
}

job() {
  case $1 in
    compose_segmentation|compose_sketch) fit "shapes32_$1" "$1" ;;
    mcm_segmentation|mcm_sketch|mcm_depth|mcm_partial_mask) fit "shapes32_${1#mcm_}" "${1#mcm_}" ;;
    controlnet_*|t2i_adapter_*) fit "shapes32_$1" "$1" ;;
    curve_*)  # the limited-data curve: segmentation MCM on the first N of the 2,000 images
      fit "shapes32_segmentation_n${1#curve_}" segmentation \
        --data.init_args.limit_train_samples "${1#curve_}" ;;
    *) echo "unknown job $1" >&2; exit 2 ;;
  esac
}

# what docs/results.md reports (mcm_depth and mcm_partial_mask also exist as jobs; they were not run:
# the multimodal MCM evaluated one modality at a time stands in for them there)
ALL=(compose_segmentation compose_sketch mcm_segmentation controlnet_segmentation curve_250 curve_500
     curve_1000 mcm_sketch controlnet_sketch controlnet_depth controlnet_partial_mask t2i_adapter_segmentation
     t2i_adapter_sketch)
mkdir -p runs
for j in "${@:-${ALL[@]}}"; do echo "== $j $(date +%T)"; job "$j"; done
