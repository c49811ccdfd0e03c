#!/usr/bin/env bash
# MCM against ControlNet (and T2I-Adapter) at the same WALL-CLOCK budget (not the same steps): each job trains for
# BUDGET (default 10 minutes) on the same 2,000 images, seeds and batch, one at a time on the otherwise idle
# machine, then is exported and evaluated on the same 32 held-out maps at strengths 1 and 2
# (docs/results.md, "Equal wall-clock"). Each method with its best known recipe: the MCM with the main job's
# min-SNR-5 weighting (docs/ablations.md) and, for the sketch, also with its region hints (mcm_sketch_regions);
# ControlNet and T2I-Adapter with their experiments' own recipes.
# Run from the repository root after `mcm data shapes --out data/shapes --train 2000 --val 200`:
#   docs/wallclock_comparison.sh [JOB ...]     (default: all; a job already evaluated is skipped)
# STRENGTHS="1 2 3 4": the strengths evaluated (default 1 2); TEST=1: also on the test split, into docs/eval/test/
set -euo pipefail
BUDGET=${BUDGET:-00:00:10:00}
RUNS=${RUNS:-runs}        # runs/wallclock_JOB: checkpoints, export, log
EVAL=${EVAL:-docs/eval}   # EVAL/wallclock_JOB: val figures; EVAL/test/wallclock_JOB with TEST=1
job_args() {  # experiment and overrides of each job
  case $1 in
    mcm_segmentation|mcm_sketch) echo "${1#mcm_} --model.init_args.loss_weighting min_snr --model.init_args.snr_gamma 5.0" ;;
    # the sketch with the main job's region hints (docs/ablations.md); the JSON has no spaces: it is word-split
    mcm_sketch_regions) echo 'sketch --model.init_args.loss_weighting min_snr --model.init_args.snr_gamma 5.0' \
      '--data.init_args.modalities {"sketch":{"region_hints":true}}' ;;
    # the sketch gap study (docs/ablations.md): the MCM also reads the frozen base's own features of x_t
    mcm_sketch_regions_base_features) echo 'sketch --model.init_args.loss_weighting min_snr' \
      '--model.init_args.snr_gamma 5.0 --model.init_args.base_features true' \
      '--data.init_args.modalities {"sketch":{"region_hints":true}}' ;;
    # and the base's features added at the MCM's own levels too (base_feature_levels)
    mcm_sketch_regions_base_features_levels) echo 'sketch --model.init_args.loss_weighting min_snr' \
      '--model.init_args.snr_gamma 5.0 --model.init_args.base_features true' \
      '--model.init_args.base_feature_levels true --data.init_args.modalities {"sketch":{"region_hints":true}}' ;;
    # and a pretrained condition encoder: the frozen base also reads the sketch drawn as an image (condition_features)
    mcm_sketch_regions_base_features_condition) echo 'sketch --model.init_args.loss_weighting min_snr' \
      '--model.init_args.snr_gamma 5.0 --model.init_args.base_features true' \
      '--model.init_args.condition_features true --data.init_args.modalities {"sketch":{"region_hints":true}}' ;;
    controlnet_segmentation|controlnet_sketch|t2i_adapter_segmentation|t2i_adapter_sketch) echo "$1" ;;
    # the README main job's recipe as it is (four maps, single-modality dropout), scored per map alone:
    # does training with the other maps make a better sketch module in the same time?
    mcm_multimodal) echo multimodal ;;
    *) echo "unknown job $1" >&2; exit 2 ;;
  esac
}
# STEPS=N: the budget as a step count instead of BUDGET's wall clock (the steps a job reaches in BUDGET on the idle
# machine, measured by bench/step_rate.sh), so that the run is immune to other work sharing the cores
budget_args() {
  if [[ -n ${STEPS:-} ]]; then echo "--trainer.max_steps $STEPS --trainer.max_time 00:02:00:00"
  else echo "--trainer.max_time $BUDGET --trainer.max_steps -1"; fi
}
run() {
  local j=$1 dir=$RUNS/wallclock_$1 out=$EVAL/wallclock_$1
  if [[ -n ${EXTRA_STRENGTH:-} ]]; then extra "$j"; return; fi
  if [[ -f $out/metrics.json ]]; then echo "skip $j"; return; fi
  local args exp; args=$(job_args "$j"); exp=${args%% *}
  mkdir -p "$RUNS"
  local t0=$SECONDS
  # shellcheck disable=SC2046,SC2086
  # shellcheck disable=SC2046
  mcm fit -c "experiments/shapes32/$exp.yaml" $(budget_args) \
    --trainer.default_root_dir "$dir" --trainer.logger.init_args.name "wallclock_$j" ${args#"$exp"} \
    > "$RUNS/wallclock_$j.log" 2>&1
  echo $((SECONDS - t0)) > "$RUNS/wallclock_$j.seconds"
  if [[ -n ${NO_EVAL:-} ]]; then return; fi  # NO_EVAL=1: train only (bench/step_rate.sh)
  mcm export "$dir/checkpoints/last.ckpt" "$dir/export"
  # shellcheck disable=SC2046
  evaluate "$j" "$out" ${STRENGTHS:-1 2 $([[ $j == mcm_multimodal ]] && echo 3)}
  # TEST=1: the same strengths on the test split too (the scale is chosen on val, the figure read on test)
  if [[ -n ${TEST:-} ]]; then
    # shellcheck disable=SC2046
    SPLIT=test evaluate "$j" "$EVAL/test/wallclock_$j" ${STRENGTHS:-1 2 $([[ $j == mcm_multimodal ]] && echo 3)}
  fi
}
evaluate() {  # JOB OUT STRENGTH...: the job's export on the same 32 held-out maps; a multimodal module per map alone
  local j=$1 out=$2; shift 2
  # shellcheck disable=SC2046
  mcm evaluate --mcm "$RUNS/wallclock_$j/export" --data "data/shapes/${SPLIT:-val}-*.tar" --n 32 --seeds 0 --steps 20 \
    --strength "$@" $([[ $j == mcm_multimodal ]] && echo --modalities segmentation sketch --per-modality) \
    --out "$out"
}
# EXTRA_STRENGTH=S: the same evaluation of an already trained job's export at one more strength, into
# docs/eval/wallclock_JOB/strength_S (the best strength of a sketch module can lie above 2)
extra() {
  local out=$EVAL/wallclock_$1/strength_$EXTRA_STRENGTH
  if [[ -f $out/metrics.json ]]; then echo "skip $1 at $EXTRA_STRENGTH"; return; fi
  evaluate "$1" "$out" "$EXTRA_STRENGTH"
}
ALL=(mcm_segmentation controlnet_segmentation mcm_sketch controlnet_sketch t2i_adapter_segmentation t2i_adapter_sketch)
for j in "${@:-${ALL[@]}}"; do echo "== $j $(date +%T)"; run "$j"; done
