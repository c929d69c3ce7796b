#!/usr/bin/env bash
# One device call (about 6 minutes): the runtime with attention pinned inside every attention module (cuDNN's fused
# kernel, "auto" in the presets), against stock and against PyTorch's own kernel choice, each in the same run:
#   1. FLUX.1-dev architecture, 1024 px, 28 steps (flux_runtime.py: runtime sdpa, runtime cudnn, FP8, FP8 + cache,
#      presets balanced / fast, which now use "auto").
#   2. SD3-medium architecture, 1024 px, 28 steps, CFG (the same contenders).
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_attention_runtime.sh   (carry .whl: diffusers)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
CONFIGS="stock,runtime,runtime cudnn,runtime fp8,runtime fp8 cache3,runtime cache3,preset balanced,preset fast"
{
  timeout 205 python3 -u benchmarks/flux_runtime.py --arch flux-dev --name flux-cudnn --configs "$CONFIGS" \
    --out "$OUT/flux" --budget-s 190
  echo "[run] flux done at $((SECONDS - START)) s"
  timeout 130 python3 -u benchmarks/flux_runtime.py --arch sd3-medium --name sd3-cudnn --configs "$CONFIGS" \
    --out "$OUT/sd3" --budget-s 115
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
