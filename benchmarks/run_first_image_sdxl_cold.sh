#!/usr/bin/env bash
# One device call (about 9 minutes), each part in its own process with its own timeout (issue 23, and issue 21's
# attention kernels):
#   1. SDPA kernels (flash / efficient / cuDNN) at Flux, SD3, SDXL and SD1.5 attention shapes, and whether a pinned
#      kernel survives torch.compile's cache (runtime/sdpa_backends.py).
#   2. SD1.5 `balanced` with compile_background=True, the compiles started when the first call ends: first image,
#      switches, steady state (runtime/first_image.py --cases background).
#   3. SDXL `balanced` with compile_background=True: the first image (a short timeline; the compile is not waited for).
#   4. SDXL portable compile artifacts: `accel precompile` and a fresh process on an empty inductor cache loading them
#      (runtime/cold_start.py --arch sdxl --cases precompile,artifacts).
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_first_image_sdxl_cold.sh   (carry .whl: diffusers)
# Files: $OUT/sdpa/, $OUT/first/, $OUT/first-sdxl/, $OUT/cold-sdxl/ (json and md each), $OUT/run.log.
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
{
  timeout 45 python3 -u benchmarks/runtime/sdpa_backends.py --out "$OUT/sdpa"
  echo "[run] sdpa done at $((SECONDS - START)) s"
  timeout 175 python3 -u benchmarks/runtime/first_image.py --out "$OUT/first" --cases background \
    --seconds "${FIRST_SECONDS:-125}"
  echo "[run] sd15 first image done at $((SECONDS - START)) s"
  timeout 70 python3 -u benchmarks/runtime/first_image.py --arch sdxl --out "$OUT/first-sdxl" --cases background \
    --seconds 15
  rm -f "$OUT"/first*/*.npy
  echo "[run] sdxl first image done at $((SECONDS - START)) s"
  LEFT=$((570 - (SECONDS - START)))
  timeout "$LEFT" python3 -u benchmarks/runtime/cold_start.py --arch sdxl --cases precompile,artifacts \
    --out "$OUT/cold-sdxl" --budget $((LEFT - 10))
  rm -f "$OUT"/cold-sdxl/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
