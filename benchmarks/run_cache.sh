#!/usr/bin/env bash
# Feature caching on the GPU (issue 6): GPU tests of accel/cache, then SD1.5 benchmarks, < 8 min in all.
#   1. DDIM 50 steps, eager: stock vs the DeepCache package (interval 3, branch 0) vs ours (interval 3, branch 0).
#   2. DPM-Solver++ 20 steps: ours eager and with CUDA graphs.
#   3. DPM-Solver++ 20 steps: ours with the compiled runtime (regional compile + graphs), and that runtime alone.
#   4. If time is left: SDXL 1024 px, 30 steps, stock vs ours (caching alone).
# Run through the device tool:  bash benchmarks/run_cache.sh   (carry .whl: the diffusers and DeepCache wheels)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
if python3 -c "import DeepCache" 2>/dev/null; then PEER=",deepcache-pkg"; else PEER=""; echo "DeepCache package not importable: no deepcache-pkg row"; fi
bench() {  # bench SECONDS NAME ARGS...: one harness run, killed after SECONDS (each run writes its own report)
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 -m apps.cli bench --arch sd15 --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v Warning
  echo "[run_cache] $name done at $((SECONDS - START)) s"
}

timeout 90 python3 -m pytest -q -m gpu tests/test_cache.py 2>&1 | tee "$OUT/cache-gpu-tests.log" | tail -3
bench 120 sd15-ddim50-cache --scheduler ddim --steps 50 --configs "stock${PEER},deepcache,deepcache-nonuniform"
bench 100 sd15-dpmpp20-cache --scheduler dpmpp_2m --steps 20 --configs stock,deepcache,deepcache+graph
LEFT=$((455 - (SECONDS - START)))
if [ "$LEFT" -gt 60 ]; then
  bench $((LEFT < 240 ? LEFT : 240)) sd15-dpmpp20-compiled --scheduler dpmpp_2m --steps 20 \
    --configs stock,compiled,deepcache+compiled
else
  echo "[run_cache] skipped the compiled runs: ${LEFT}s left"
fi
LEFT=$((455 - (SECONDS - START)))
if [ "${CACHE_SDXL:-0}" = 1 ] && [ "$LEFT" -gt 110 ]; then  # SDXL 1024 px, 30 steps, caching alone (issue target: >= 2x over stock)
  timeout "$LEFT" python3 -m apps.cli bench --arch sdxl --scheduler dpmpp_2m --steps 30 --runs 5 --warmup 1 \
    --configs stock,deepcache --out "$OUT/sdxl-dpmpp30-cache" 2>&1 | tee "$OUT/sdxl-dpmpp30-cache.log" | grep -v Warning
else
  echo "[run_cache] skipped SDXL: ${LEFT}s left"
fi
echo "[run_cache] took $((SECONDS - START)) s"
