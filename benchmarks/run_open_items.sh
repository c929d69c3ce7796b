#!/usr/bin/env bash
# One H100 call for the measurements issues 4, 5, 6 and 10 still owed (2026-11-23):
#   GPU tests; tuned schedules on the embedded model (issue 4); SDXL DeepCache intervals against
#   stock (issue 6); regional compilation's first call with a cold and a warm inductor cache
#   (issue 5); `accel batch` throughput against a stock batch-1 loop (issue 10).
# Through the device tool:  bash benchmarks/run_open_items.sh   (carry .whl)
set -o pipefail
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
R=/tmp/open-items; mkdir -p $R  # everything lands here; $OUT gets one tarball
T0=$(date +%s)
# Packed after every stage, so a run cut short still brings back what it finished.
stamp() { (cd $R && tar czf "$OUT/results.tgz" --exclude='images-*' --exclude='prompts.txt' .); echo "[$(( $(date +%s) - T0 )) s] $*"; }

stamp "GPU tests"
timeout 150 python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$R/gpu-tests.log" | tail -n 5

stamp "tuned schedules (embedded model)"
timeout 120 python3 benchmarks/tuned_embedded.py --device cuda --calibration 40 \
  --out "$R/tuned-embedded" 2>&1 | tail -n 16

stamp "SDXL DeepCache intervals"
timeout 150 python3 -m apps.cli bench --arch sdxl --steps 30 --configs stock,deepcache,deepcache-i4,deepcache-i5 \
  --out "$R/sdxl-dpmpp30-cache" 2>&1 | grep -v Warning | tail -n 9

stamp "BK-SDM speed table (issue 7)"
timeout 150 python3 benchmarks/pruning/measure.py --speed-only --out "$R/pruning-speed" 2>&1 | grep -v Warning | tail -n 4

stamp "batch throughput, 1 GPU"
timeout 200 python3 benchmarks/batch_throughput.py --arch sd15 --nprocs 1 --n 192 --n-stock 12 --batch-size 8 \
  --preset balanced --out "$R/batch-h100" 2>&1 | tail -n 8

# Regional compilation: the first process compiles into an empty inductor cache, the second
# reuses it (TORCHINDUCTOR_CACHE_DIR persists between processes).
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-regional
for pass in cold warm; do
  stamp "regional compile, $pass cache"
  timeout 120 python3 -m apps.cli bench --arch sd15 --steps 20 --configs stock,compile+graph \
    --out "$R/sd15-regional-$pass" 2>&1 | grep -v Warning | tail -n 4
done
stamp "done"
ls -la "$OUT"
