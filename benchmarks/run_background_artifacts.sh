#!/usr/bin/env bash
# One device call (about 8 minutes; not run yet), each part in its own process with its own timeout (issue 23):
# portable artifacts with compile_background. For SD1.5 and SDXL: `accel precompile`'s artifacts written
# (cold_start.py --cases precompile), then a fresh process on an empty inductor cache runs `balanced` +
# compile_background with those artifacts (first_image.py --compile-cache): the first image at eager speed, then
# how soon the compiled code takes over when the thread only traces and reads the artifacts (targets: the first
# compiled image <= 10 s for SD1.5, <= 20 s for SDXL; the artifacts' first call without the option: 15.9 / 34.0 s).
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_background_artifacts.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
ART=$(mktemp -d)
{
  for arch in sd15 sdxl; do
    timeout 200 python3 -u benchmarks/runtime/cold_start.py --arch $arch --cases precompile --artifacts "$ART" \
      --out "$OUT/precompile-$arch" --budget 190
    echo "[run] $arch precompile done at $((SECONDS - START)) s"
    timeout 100 python3 -u benchmarks/runtime/first_image.py --arch $arch --cases background --seconds 60 \
      --compile-cache "$ART/$arch" --out "$OUT/background-artifacts-$arch"
    echo "[run] $arch background with artifacts done at $((SECONDS - START)) s"
  done
  rm -f "$OUT"/*/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
