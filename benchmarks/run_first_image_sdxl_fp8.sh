#!/usr/bin/env bash
# One device call (about 9 minutes), each part in its own process with its own timeout:
#   1. issue 23: the first image while the compile runs, SD1.5 `balanced` with compile_background=True, fresh
#      process and empty inductor cache, calls back to back for 150 s (first_image.py --cases background).
#   2. issue 22: SDXL architecture, 1024 px, DPM-Solver++ 30 steps, end to end: stock, the `balanced` runtime at
#      16 bit and with FP8 (quantize.py --arch sdxl; the UNet step timed over 3 more pipeline calls).
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_first_image_sdxl_fp8.sh   (carry .whl: diffusers)
# Files: $OUT/first/first_image.{json,md}, $OUT/sdxl-fp8/quantize.{json,md}, $OUT/run.log.
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
{
  timeout "${FIRST_LIMIT:-200}" python3 -u benchmarks/runtime/first_image.py --out "$OUT/first" --cases background \
    --seconds "${FIRST_SECONDS:-150}"
  rm -f "$OUT"/first/*.npy
  echo "[run_first_image_sdxl_fp8] first image done at $((SECONDS - START)) s"
  timeout "${SDXL_LIMIT:-$((560 - (SECONDS - START)))}" python3 -u benchmarks/quantize.py --out "$OUT/sdxl-fp8" \
    --quality-n 0 --arch sdxl --unet-calls 3 --configs "${SDXL_CONFIGS:-stock,compiled 16-bit,compiled fp8}"
  echo "[run_first_image_sdxl_fp8] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
