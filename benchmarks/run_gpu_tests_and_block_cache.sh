#!/usr/bin/env bash
# One H100 call: every GPU test of the suite (CUDA graphs, caches and the block cache's conditional
# nodes under graphs), then the block cache's step timings and embedded-model table.
#   bash benchmarks/run_gpu_tests_and_block_cache.sh      (through the device tool, carry .whl)
set -o pipefail
source benchmarks/device_setup.sh
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 250 python3 -m pytest -q -m gpu -rA tests/test_runtime.py tests/test_cache.py tests/test_block_cache_dit.py \
  2>&1 | tee "$OUT/gpu-tests.log" | grep -v Warning | tail -30
echo "[gpu tests done at $((SECONDS - START)) s]"
timeout $((560 - (SECONDS - START))) python3 benchmarks/block_cache_step.py --out "$OUT" 2>&1 \
  | tee "$OUT/block_cache_step.log" | grep -v Warning | tail -40
echo "[done at $((SECONDS - START)) s]"
