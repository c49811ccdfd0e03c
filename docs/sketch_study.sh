#!/usr/bin/env bash
# Why a sketch alone does not steer the MCM (docs/ablations.md, "Sketch alone"): sketch-only MCMs
# (experiments/shapes32/sketch.yaml, 2,000 images) trained for a fixed number of steps with one change each,
# exported (EMA weights), then
#   - sketch F1 on the same 32 held-out maps (seed 0, DDIM 20) at strengths 1, 2, 3, and
#   - the denoising loss by noise level with each sample's own sketch vs another sample's
#     (python -m mcm.evaluation.condition_use): a module that uses its sketch has the lower loss with its own.
# Fixed steps, not wall clock: the runs shared the 2 cores two at a time (1 thread each).
# Run from the repository root after `mcm data shapes --out data/shapes --train 2000 --val 200`:
#   docs/sketch_study.sh [VARIANT ...]     (default: all; one already evaluated is skipped)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
variant_args() {  # steps, then the overrides of each variant
  case $1 in
    cubic) echo 600 --model.init_args.timestep_sampling cubic ;;
    fast) echo 600 --model.init_args.lr 2.0e-3 --model.init_args.warmup_steps 0 \
      --data.init_args.modalities "'{\"sketch\": {\"max_dropout\": 0.0, \"dilate_prob\": 0.0}}'" ;;
    long) echo 1500 ;;
    clamped_snr) echo 600 --model.init_args.loss_weighting clamped_snr ;;
    stroke_min_snr) echo 600 --model.init_args.loss_weighting min_snr --model.init_args.map_loss_weight 4.0 ;;
    regions_min_snr) echo 600 --model.init_args.loss_weighting min_snr \
      --data.init_args.modalities "'{\"sketch\": {\"region_hints\": true}}'" ;;
    regions_open_min_snr) echo 600 --model.init_args.loss_weighting min_snr --data.init_args.modalities \
      "'{\"sketch\": {\"region_hints\": [\"enclosed\", \"crossing_parity\", \"enclosed_open_border\"]}}'" ;;
    regions_levels) echo 600 --model.init_args.loss_weighting min_snr --data.init_args.modalities \
      "'{\"sketch\": {\"region_hints\": true, \"detail_levels\": [[0.45, 0.9], [0.3, 0.6], [0.15, 0.3]]}}'" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
run() {
  local v=$1 dir=runs/sk_$1 out=docs/eval/sketch_$1
  if [[ -f $out/metrics.json ]]; then echo "skip $v"; return; fi
  local args steps; args=$(variant_args "$v"); steps=${args%% *}; args=${args#"$steps"}
  mkdir -p runs "$out"
  local t0=$SECONDS
  # shellcheck disable=SC2086
  eval mcm fit -c experiments/shapes32/sketch.yaml --trainer.max_steps "$steps" --trainer.max_time 00:01:30:00 \
    --trainer.default_root_dir "$dir" --trainer.logger.init_args.name "sk_$v" \
    --trainer.val_check_interval "$steps" $args > "runs/sk_$v.log" 2>&1
  echo $((SECONDS - t0)) > "runs/sk_$v.seconds"
  mcm export "$dir/checkpoints/last.ckpt" "$dir/export"
  mcm evaluate --mcm "$dir/export" --data "data/shapes/val-*.tar" --n 32 --seeds 0 --steps 20 \
    --strength 1 2 3 --out "$out"
  python -m mcm.evaluation.condition_use --mcm "$dir/export" --data "data/shapes/val-*.tar" --n 100 \
    --json "$out/condition_use.json" | tee "$out/condition_use.md"
}
for v in "${@:-cubic fast long clamped_snr stroke_min_snr}"; do for w in $v; do echo "== $w $(date +%T)"; run "$w"; done; done
