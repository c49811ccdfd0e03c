#!/usr/bin/env bash
# Evaluates every module of docs/comparison.yaml on the same held-out maps, seeds and sampler, then
# builds the comparison table and the limited-data curve in docs/results.md. Run from the repository
# root after docs/train_comparison.sh. Usage: [SPLIT=test] docs/make_comparison.sh [EVAL ...] (default: all).
# SPLIT=val (the default) writes docs/eval/NAME: the split choices are made on; SPLIT=test writes
# docs/eval/test/NAME, the split the reported figures are read on (train, val, test: docs/results.md).
set -euo pipefail
SPLIT=${SPLIT:-val}
DATA="data/shapes/$SPLIT-*.tar"
OUT=docs/eval
[[ $SPLIT == val ]] || OUT=docs/eval/$SPLIT
COMMON=(--data "$DATA" --n 64 --seeds 0 1 --steps 25)

ev() {  # ev NAME [mcm evaluate args...]
  local name=$1; shift
  if [[ -f $OUT/$name/metrics.json ]]; then echo "skip $name"; return; fi
  mcm evaluate "${COMMON[@]}" "$@" --out "$OUT/$name"
}

one() {
  case $1 in
    base) ev base ;;
    # the multimodal run as trained (export without --strength): every modality alone and all four,
    # at strength 1 and 2, and a strength sweep (segmentation, sketch, both) that picks the default_strength recorded in
    # the shipped module (mcm export --strength, see mcm/weights/shapes32/mcm_multimodal/README.md)
    mcm_multimodal) ev mcm_multimodal --mcm runs/shapes32_multimodal_4000/export --per-modality --strength 1 2 ;;
    strength_sweep) ev strength_sweep --mcm runs/shapes32_multimodal_4000/export --modalities segmentation sketch \
                      --per-modality --strength 1 1.5 2 2.5 3 ;;
    mcm_*|controlnet_*|t2i_adapter_*) ev "$1" --mcm "runs/shapes32_${1#mcm_}/export" --strength 1 2 ;;
    regional) python -m mcm.evaluation.regional --data "$DATA" --n 64 --seeds 0 1 --out "$OUT/regional" ;;
    compose) ev compose_segmentation_sketch --mcm shapes32_compose_segmentation shapes32_compose_sketch \
               --weights 1 1 --strength 1 2 ;;
    curve_*) ev "$1" --mcm "runs/shapes32_segmentation_n${1#curve_}/export" --strength 1 2 ;;
    curve)  # alignment and FID vs number of training images (2,000 = the per-modality segmentation MCM)
      mcm evaluate --curve 250=docs/eval/curve_250/metrics.json 500=docs/eval/curve_500/metrics.json \
        1000=docs/eval/curve_1000/metrics.json 2000=docs/eval/mcm_segmentation/metrics.json --out docs/eval/curve ;;
    table) python -m mcm.evaluation.comparison_report docs/comparison.yaml --out docs/eval/comparison.md ;;
    *) echo "unknown evaluation $1" >&2; exit 2 ;;
  esac
}

ALL=(base mcm_multimodal strength_sweep mcm_segmentation mcm_sketch controlnet_segmentation
     controlnet_sketch controlnet_depth controlnet_partial_mask t2i_adapter_segmentation t2i_adapter_sketch compose
     curve_250 curve_500 curve_1000 curve regional table)
for e in "${@:-${ALL[@]}}"; do echo "== $e $(date +%T)"; one "$e"; done
