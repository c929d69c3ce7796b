#!/usr/bin/env bash
# One device call (about 9.5 minutes; not run yet), each part in its own process with its own timeout (issue 23):
#   1. SD1.5 `balanced` + compile_background as the preset has it (channels-last on), after the compile-worker fix:
#      first image unprofiled, calls during the compile, switch, steady state (first_image.py --cases background).
#   2. SD1.5 `balanced` as it is in the same run: its cold first call and steady state (the background case's steady
#      state must match it).
#   3. SD1.5 UNet: torch's aot_compile against the portable artifacts (aot_compile.py): does a fresh process skip
#      dynamo's trace (the artifacts' first call is 15.9 s, the target 10 s)?
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_background_worker_aot.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
F=benchmarks/runtime/first_image.py
left() { echo $(($1 - (SECONDS - START))); }
{
  timeout 200 python3 -u $F --cases background --seconds 150 --out "$OUT/background"
  echo "[run] background done at $((SECONDS - START)) s"
  timeout 170 python3 -u $F --cases balanced --out "$OUT/balanced"
  echo "[run] balanced done at $((SECONDS - START)) s"
  L=$(left 575)
  timeout "$L" python3 -u benchmarks/runtime/aot_compile.py --arch sd15 --out "$OUT/aot" --timeout $(((L - 10) / 3))
  rm -f "$OUT"/*/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
