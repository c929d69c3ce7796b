#!/usr/bin/env bash
# The compiled runtime on the GPU: GPU tests, then SD1.5 / SDXL benchmarks against stock diffusers.
# Run through the device tool:  bash benchmarks/run_runtime.sh [sd15|sdxl]   (carry .whl)
set -o pipefail
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
case "${1:-sd15}" in
  sd15)
    python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu-tests.log" | tail -3
    python3 -m apps.cli bench --arch sd15 --steps 20 --unet-step \
      --configs stock,graph,compile+graph,full-compile+graph,graph-all,full-compile+graph-all,fast \
      --out "$OUT/sd15-dpmpp20" 2>&1 | tee "$OUT/sd15.log" | grep -v Warning
    ;;
  sd15-layout)
    python3 -m apps.cli bench --arch sd15 --steps 20 --unet-step \
      --configs stock,full-compile+graph-all,fused+full-compile+graph-all,channels-last+full-compile+graph-all \
      --out "$OUT/sd15-layout" 2>&1 | tee "$OUT/sd15-layout.log" | grep -v Warning
    ;;
  sdxl+layout)
    bash "$0" sdxl; bash "$0" sd15-layout
    ;;
  sdxl)
    python3 -m apps.cli bench --arch sdxl --steps 30 --unet-step --configs stock,compiled,deepcache \
      --out "$OUT/sdxl-dpmpp30" 2>&1 | tee "$OUT/sdxl.log" | grep -v Warning
    # Regional compilation's first-call time (issue 5 target: <= 60 s on SD1.5).
    python3 -m apps.cli bench --arch sd15 --steps 20 --unet-step --configs stock,compile+graph \
      --out "$OUT/sd15-regional" 2>&1 | tee "$OUT/sd15-regional.log" | grep -v Warning
    ;;
esac
