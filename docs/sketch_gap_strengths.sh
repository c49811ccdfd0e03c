#!/usr/bin/env bash
# The sketch gap study's strengths above 4 (docs/ablations.md): the MCM's sketch F1 was still rising at 4, so its
# best strength on val lies higher. Each trained export of RUNS (default runs/gap7) is scored again on val at the
# sets VAL_SETS (default "5 6|7 8 10", one evaluation per set) and on test at TEST_SET (default "5 6 7 8 10"), into
# EVAL (default docs/eval/sketch_gap_7min), next to docs/wallclock_comparison.sh's own evaluation;
# python -m mcm.evaluation.split_report docs/sketch_gap.yaml pools them.
#   docs/sketch_gap_strengths.sh [JOB ...]   (default: mcm_sketch_regions mcm_sketch_regions_base_features)
#   the 20-minute rows: RUNS=runs/gap20 EVAL=docs/eval/sketch_gap_20min VAL_SETS="7 8 10" TEST_SET="7 8 10" \
#                       docs/sketch_gap_strengths.sh mcm_sketch_regions_base_features
set -euo pipefail
RUNS=${RUNS:-runs/gap7}
EVAL=${EVAL:-docs/eval/sketch_gap_7min}
VAL_SETS=${VAL_SETS:-5 6|7 8 10}
TEST_SET=${TEST_SET:-5 6 7 8 10}
ev() {  # export split out strengths...
  local export=$1 split=$2 out=$3; shift 3
  if [[ -f $out/metrics.json ]]; then echo "skip $out"; return; fi
  mcm evaluate --mcm "$export" --data "data/shapes/$split-*.tar" --n 32 --seeds 0 --steps 20 --strength "$@" \
    --out "$out"
}
name() { local IFS=_; echo "strength_$*"; }  # "7 8 10" -> strength_7_8_10
JOBS=("$@")
[[ ${#JOBS[@]} -gt 0 ]] || JOBS=(mcm_sketch_regions mcm_sketch_regions_base_features)
for j in "${JOBS[@]}"; do
  IFS='|' read -ra sets <<< "$VAL_SETS"
  for set in "${sets[@]}"; do
    # shellcheck disable=SC2086
    ev "$RUNS/wallclock_$j/export" val "$EVAL/wallclock_$j/$(name $set)" $set
  done
  read -ra t <<< "$TEST_SET"
  ev "$RUNS/wallclock_$j/export" test "$EVAL/test/wallclock_$j/strength_${t[0]}_${t[-1]}" "${t[@]}"
done
