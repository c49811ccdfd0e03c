#!/usr/bin/env bash
# Training steps per second of docs/wallclock_comparison.sh's jobs, side by side on the idle machine (ROUNDS rounds,
# the jobs interleaved, N steps each), and the steps each reaches in BUDGET_S seconds at that rate: the STEPS budget
# (STEPS=N docs/wallclock_comparison.sh JOB) of an equal-wall-clock run that must not depend on what else later
# shares the cores. The rate is the training loop's own (its progress bar's it/s at the last step), without start-up.
#   bench/step_rate.sh JOB ...            e.g. bench/step_rate.sh mcm_sketch_regions mcm_sketch_regions_base_features
set -euo pipefail
N=${N:-150}; ROUNDS=${ROUNDS:-2}; BUDGET_S=${BUDGET_S:-420}
out=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
  for j in "$@"; do
    STEPS=$N NO_EVAL=1 RUNS="$out/r$r" EVAL="$out/eval" docs/wallclock_comparison.sh "$j" > /dev/null
    rate=$(grep -o '[0-9.]*it/s' "$out/r$r/wallclock_$j.log" | tail -1 | tr -d 'it/s')
    echo "$r $j $rate"
  done
done | tee "$out/rates.txt"
echo "job  median it/s  steps in ${BUDGET_S} s"
for j in "$@"; do  # the median over the rounds (sort -n, then the middle one or the mean of the middle two)
  grep " $j " "$out/rates.txt" | awk '{print $3}' | sort -n | awk -v b="$BUDGET_S" -v j="$j" \
    '{r[NR]=$1} END {m=(NR%2)?r[(NR+1)/2]:(r[NR/2]+r[NR/2+1])/2; printf "%s  %.3f  %d\n", j, m, m*b}'
done
