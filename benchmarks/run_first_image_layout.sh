#!/usr/bin/env bash
# One device call (about 9 minutes), each part in its own process with its own timeout (issue 23): where the
# background option's 10.4 s SD1.5 first call goes, against the 1.4 s eager floor.
#   1. The eager floor, and the same with the runtime's channels-last alone (NHWC eager convolutions' first plans).
#   2. SD1.5 `balanced` + compile_background, the first call alone under cProfile (the preset as it is).
#   3. The same with channels_last off: first image, switches, steady state (150 s timeline).
#   4. SD1.5 `balanced` as it is (channels-last on): cold first call and steady state, against 3's steady state.
#   5. SDXL `balanced` + compile_background with channels_last off: the first image.
#   6. SD1.5 portable artifacts with the preset's compile_components: precompile, then a fresh process loading them.
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_first_image_layout.sh   (carry .whl: diffusers)
# Files: $OUT/<part>/ (json and md each), $OUT/run.log.
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
F=benchmarks/runtime/first_image.py
{
  timeout 45 python3 -u $F --cases eager --out "$OUT/eager"
  timeout 45 python3 -u $F --cases eager --channels-last on --out "$OUT/eager-cl"
  echo "[run] eager done at $((SECONDS - START)) s"
  timeout 60 python3 -u $F --cases background --seconds 0 --profile-first --out "$OUT/bg-profile"
  echo "[run] profile done at $((SECONDS - START)) s"
  timeout 200 python3 -u $F --cases background --channels-last off --seconds 150 --out "$OUT/bg-cl-off"
  echo "[run] background done at $((SECONDS - START)) s"
  timeout 110 python3 -u $F --cases balanced --out "$OUT/balanced"
  echo "[run] balanced done at $((SECONDS - START)) s"
  timeout 60 python3 -u $F --arch sdxl --cases background --channels-last off --seconds 15 --out "$OUT/sdxl-cl-off"
  rm -f "$OUT"/*/*.npy
  echo "[run] sdxl done at $((SECONDS - START)) s"
  LEFT=$((575 - (SECONDS - START)))
  timeout "$LEFT" python3 -u benchmarks/runtime/cold_start.py --arch sd15 --cases precompile,artifacts \
    --out "$OUT/cold-sd15" --budget $((LEFT - 10))
  rm -f "$OUT"/*/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
