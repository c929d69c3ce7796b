#!/usr/bin/env bash
# One device call (about 9 minutes), each part in its own process with its own timeout (issue 23):
#   1. SD1.5: the first call of the preset's sampler alone, eager, in a fresh process (first_image.py --cases eager):
#      the floor of any first image.
#   2. SD1.5 `balanced` compiling every component (denoiser, VAE decoder, text encoder), cold (cold_start.py).
#   3. SD1.5 `balanced` compiling denoiser and VAE decoder, the text encoder on CUDA graphs alone: cold, precompile,
#      artifacts. 2 and 3 in one run: the 5% rule on their steady states.
#   4. SDXL, as 3: precompile and artifacts.
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_compile_components.sh   (carry .whl: diffusers)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
PICK=${PICK:-denoiser,vae}
{
  timeout 60 python3 -u benchmarks/runtime/first_image.py --out "$OUT/eager" --cases eager
  echo "[run] eager done at $((SECONDS - START)) s"
  timeout 110 python3 -u benchmarks/runtime/cold_start.py --arch sd15 --cases cold --compile-components all \
    --out "$OUT/sd15-all" --budget 105
  echo "[run] sd15 all done at $((SECONDS - START)) s"
  timeout 200 python3 -u benchmarks/runtime/cold_start.py --arch sd15 --compile-components "$PICK" \
    --out "$OUT/sd15-pick" --budget 195
  echo "[run] sd15 $PICK done at $((SECONDS - START)) s"
  LEFT=$((570 - (SECONDS - START)))
  timeout "$LEFT" python3 -u benchmarks/runtime/cold_start.py --arch sdxl --cases precompile,artifacts \
    --compile-components "$PICK" --out "$OUT/sdxl-pick" --budget $((LEFT - 10))
  rm -f "$OUT"/*/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
