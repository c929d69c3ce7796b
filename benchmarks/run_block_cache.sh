#!/usr/bin/env bash
# Block cache on the GPU (issue 6): its GPU tests (graph replays decide on the GPU, no host sync, skipped
# blocks not executed), then step-level timings (SD1.5 UNet, PixArt-XL-sized DiT) and the embedded model.
# About 3-5 min. Run through the device tool:  bash benchmarks/run_block_cache.sh   (carry .whl)
# CPU check of the whole script with tiny models:  SMOKE=1 bash benchmarks/run_block_cache.sh
set -o pipefail
if [ "${SMOKE:-0}" != 1 ]; then source benchmarks/device_setup.sh; fi
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  python3 benchmarks/block_cache_step.py --smoke --out "$OUT" 2>&1 | tee "$OUT/block_cache_step.log" | grep -v Warning
  exit
fi
timeout 240 python3 -m pytest -q -m gpu -rA \
  "tests/test_cache.py::test_block_cache_under_cuda_graphs_decides_on_the_gpu" \
  "tests/test_block_cache_dit.py::test_dit_block_cache_under_cuda_graphs_matches_eager_on_gpu" \
  2>&1 | tee "$OUT/block-cache-gpu-tests.log" | grep -v Warning | tail -40
echo "[run_block_cache] GPU tests done at $((SECONDS - START)) s"
timeout 270 python3 benchmarks/block_cache_step.py --out "$OUT" 2>&1 | tee "$OUT/block_cache_step.log" | grep -v Warning
echo "[run_block_cache] took $((SECONDS - START)) s"
