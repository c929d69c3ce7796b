#!/usr/bin/env bash
# One device call (at most 430 s), issue 22: FP8 on the wide layers only (RuntimeConfig.quantize_min_out_features
# =3072, where fp8_linear.py saw every layer gain), against FP8 on every layer and 16 bit, in the same run:
#   1. SD3-medium architecture (1024 px, 28 steps, CFG): stock, runtime, runtime fp8, runtime fp8 wide. sd3-fp8.{json,md}
#   2. SD1.5 architecture (512 px, DPM-Solver++ 20, `balanced` runtime): stock, compiled 16-bit, compiled fp8 wide,
#      compiled fp8, UNet step at CFG batch 2. quantize.{json,md}
# Through the device tool: OUT=/tmp/res bash benchmarks/run_fp8_wide.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  timeout 170 python3 -u benchmarks/flux_runtime.py --arch sd3-medium --name sd3-fp8 --out "$OUT/sd3" --budget-s 150 \
    --configs "stock,runtime,runtime fp8,runtime fp8 wide"
  echo "[run] sd3 done at $((SECONDS - START)) s"
  timeout "$(left 425)" python3 -u benchmarks/quantize.py --out "$OUT/sd15" --quality-n 0 --arch sd15 --unet-calls 3 \
    --configs "stock,compiled 16-bit,compiled fp8 wide,compiled fp8"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
