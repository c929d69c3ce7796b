#!/usr/bin/env bash
# Block cache on the GPU (issue 6): its GPU tests (per-block graphs and, where torch has conditional nodes,
# graph replays deciding on the GPU), then block_cache_step.py: SD1.5 end to end (stock, whole-UNet graph,
# block cache eager and with graphs; DPM-Solver++ 20, 512 px, fp16), per-call timings (SD1.5 UNet,
# PixArt-XL-sized DiT) and the embedded model's PSNR, graphs vs eager. About 4-5 min, hard budget 6.
#   bash benchmarks/run_block_cache.sh                  (through the device tool, carry .whl)
#   SMOKE=1 bash benchmarks/run_block_cache.sh          (CPU check of the whole script with tiny sizes)
set -o pipefail
if [ "${SMOKE:-0}" != 1 ]; then source benchmarks/device_setup.sh; fi
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
GPU_TESTS=(
  tests/test_block_cache_graphs.py
  "tests/test_cache.py::test_block_cache_under_cuda_graphs_decides_on_the_gpu"
  "tests/test_block_cache_dit.py::test_dit_block_cache_under_cuda_graphs_matches_eager_on_gpu"
  "tests/test_block_cache_dit.py::test_dit_options_under_cuda_graphs_match_eager_on_gpu"
)
if [ "${SMOKE:-0}" = 1 ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  # The GPU tests cannot run here: check that every one of them is collected (no typo in a node id).
  python3 -m pytest -q --collect-only -m gpu "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/block-cache-gpu-tests.log" | tail -3
  [ "$(grep -c '::' "$OUT/block-cache-gpu-tests.log")" -ge 4 ] || { echo "[run_block_cache] GPU tests not collected"; exit 1; }
  python3 benchmarks/block_cache_step.py --smoke --out "$OUT" 2>&1 | tee "$OUT/block_cache_step.log" | grep -v Warning | tail -60
  echo "[run_block_cache] smoke took $((SECONDS - START)) s"
  exit
fi
timeout 150 python3 -m pytest -q -m gpu -rA "${GPU_TESTS[@]}" \
  2>&1 | tee "$OUT/block-cache-gpu-tests.log" | grep -v Warning | tail -25
echo "[run_block_cache] GPU tests done at $((SECONDS - START)) s"
timeout $((340 - (SECONDS - START))) python3 benchmarks/block_cache_step.py --out "$OUT" 2>&1 \
  | tee "$OUT/block_cache_step.log" | grep -v Warning | tail -70
echo "[run_block_cache] took $((SECONDS - START)) s"
