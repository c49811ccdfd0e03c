#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU (under 8 minutes on one H200-class GPU):
#   1. the tests marked `cuda` (bf16 training steps on every family's tiny base, the sampling oracle on CUDA,
#      decoding leaves the CUDA generator alone, no host sync in the training step);
#   2. SD 1.5's architecture (random weights) at 512 px with the base in bf16: MCM step / base forward,
#      ControlNet step / MCM step, full fine-tuning, the base-free step, peak memory of each (bench/train_step.py);
#   3. SDXL's architecture at 1024 px: MCM step / base forward, ControlNet step / MCM step (bench/families.py);
#   4. the JSON of each in OUT_DIR and the "GPU" table of docs/performance.md (bench/gpu_table.py).
#
#   bash bench/gpu_suite.sh [OUT_DIR]        # default docs/bench/gpu
#
# MCM_GPU_SUITE_TINY=1 runs every step on tiny models on whatever device there is and leaves
# docs/performance.md alone: tests/test_bench.py runs it so on the CPU, where step 1's tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/bench/gpu}"
mkdir -p "$OUT"
if [ "${MCM_GPU_SUITE_TINY:-0}" = "1" ]; then
  SD=(--tiny --quick); FAM=(--tiny --latent 8 --reps 1); DOC=()
else
  SD=(--sd-latent 64 --base-dtype bfloat16 --quick); FAM=(--latent 128 --reps 3); DOC=(--doc docs/performance.md)
fi
python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (no CUDA: the cuda tests skip)')"

echo "== 1. tests marked cuda"
python -m pytest -m cuda -p no:randomly -o addopts="" -q --junitxml "$OUT/cuda_tests.xml" \
  tests/test_device_paths.py tests/test_resume.py tests/test_sync_free_step.py

echo "== 2. SD 1.5 architecture"
python bench/train_step.py --models sd15 "${SD[@]}" --json "$OUT/train_step_sd15.json"

echo "== 3. SDXL architecture"
python bench/families.py --models sdxl "${FAM[@]}" --json "$OUT/families_sdxl.json"

echo "== 4. table"
python -m bench.gpu_table "$OUT" "${DOC[@]}"
