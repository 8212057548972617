#!/bin/bash
# Does a grid-scaled APA weight help on the reference model (7x7 patch grid)?
# w4a4 (mse ranges, no fine-tuning) top-1 on the 10k Fashion-MNIST test images, calibrated on
# 32 synthetic images (200 iterations, bf16), seeds 0 and 1. Results: docs/apa-weight-probe.md.
set -u
work=${WORK:-/tmp/apa}
mkdir -p "$work"
run() { bash "$(dirname "$0")/../tools/dev.sh" run "$@"; }
for seed in 0 1; do
  for cfg in "psaq" "sardfq --apa-weight 1000" "sardfq --apa-weight 62"; do
    tag=$(echo "$cfg" | tr ' ' '_')_$seed
    run synthesize --method $cfg --iters 200 --bf16 --seed $seed --out "$work/$tag.safetensors" --no-samples --quiet --overwrite >/dev/null 2>&1
    run quantize --calib "$work/$tag.safetensors" --scheme w4a4 --out "$work/q_$tag" --quiet >/dev/null 2>&1
    echo "$tag $(run eval --model "$work/q_$tag" --data fashion-mnist --json)"
  done
done
