#!/usr/bin/env bash
# One device call (about 9.5 minutes), each part in its own process with its own timeout, in order of need:
#   1. FLUX.1-dev architecture, 1024 px, 28 steps (flux_runtime.py): stock, the runtime with PyTorch's own attention
#      kernel and with cuDNN's pinned inside every attention module, FP8, FP8 + fixed cache, preset balanced (which, at the run,
#      used attention="auto", since dropped).
#   2. SD1.5 `balanced`, cold, compiling every component, then compiling denoiser and VAE decoder only (the text
#      encoder on CUDA graphs alone): cold, precompile, artifacts (cold_start.py): the 5% rule and the artifacts' first
#      call.
#   3. SD1.5: the preset's sampler alone, eager, first call in a fresh process (first_image.py --cases eager).
#   4. SD3-medium architecture, 1024 px, 28 steps, CFG: stock, runtime, runtime cudnn, FP8 + fixed cache.
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_attention_and_components.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
left() { echo $(($1 - (SECONDS - START))); }
{
  timeout 175 python3 -u benchmarks/flux_runtime.py --arch flux-dev --name flux-cudnn --out "$OUT/flux" \
    --configs "stock,runtime,runtime cudnn,runtime fp8,runtime fp8 cache3,preset balanced" --budget-s 400
  echo "[run] flux done at $((SECONDS - START)) s"
  timeout 100 python3 -u benchmarks/runtime/cold_start.py --arch sd15 --cases cold --compile-components all \
    --out "$OUT/sd15-all" --budget 400
  echo "[run] sd15 all done at $((SECONDS - START)) s"
  timeout "$(left 480)" python3 -u benchmarks/runtime/cold_start.py --arch sd15 --compile-components denoiser,vae \
    --out "$OUT/sd15-pick" --budget 400
  echo "[run] sd15 denoiser,vae done at $((SECONDS - START)) s"
  timeout 40 python3 -u benchmarks/runtime/first_image.py --out "$OUT/eager" --cases eager
  echo "[run] eager done at $((SECONDS - START)) s"
  timeout "$(left 575)" python3 -u benchmarks/flux_runtime.py --arch sd3-medium --name sd3-cudnn --out "$OUT/sd3" \
    --configs "stock,runtime,runtime cudnn,runtime fp8 cache3" --budget-s 400
  rm -f "$OUT"/*/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
