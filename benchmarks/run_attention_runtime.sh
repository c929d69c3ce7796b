#!/usr/bin/env bash
# One device call (about 9 minutes): the runtime with attention pinned inside every attention module (cuDNN's fused
# kernel, "auto" in the presets), against stock and against PyTorch's own kernel choice, each in the same run:
#   1. FLUX.1-dev architecture, 1024 px, 28 steps (flux_runtime.py: runtime sdpa, runtime cudnn, FP8, FP8 + cache,
#      presets balanced / fast, which now use "auto").
#   2. SD3-medium architecture, 1024 px, 28 steps, CFG (the same contenders).
#   3. SD1.5 architecture, 512 px, batch 2: the UNet step, stock / balanced runtime 16-bit / FP8 (quantize.py).
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_attention_runtime.sh   (carry .whl: diffusers)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
CONFIGS="stock,runtime,runtime cudnn,runtime fp8,runtime fp8 cache3,runtime cache3,preset balanced,preset fast"
{
  timeout 230 python3 -u benchmarks/flux_runtime.py --arch flux-dev --name flux-cudnn --configs "$CONFIGS" \
    --out "$OUT/flux" --budget-s 215
  echo "[run] flux done at $((SECONDS - START)) s"
  timeout 150 python3 -u benchmarks/flux_runtime.py --arch sd3-medium --name sd3-cudnn --configs "$CONFIGS" \
    --out "$OUT/sd3" --budget-s 135
  echo "[run] sd3 done at $((SECONDS - START)) s"
  timeout $((565 - (SECONDS - START))) python3 -u benchmarks/quantize.py --out "$OUT/sd15" --quality-n 0 \
    --arch sd15 --unet-calls 3 --configs "stock,compiled 16-bit,compiled fp8"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
