#!/usr/bin/env bash
# One device call (at most 560 s), each part in its own process with its own timeout:
#   1. Sana 1600M architecture (random weights, bf16, 1024 px, 20 steps, CFG 4.5): stock, the DiT runtime, + FP8,
#      + the every-3 cache, the `balanced` and `fast` presets as a user gets them, stock again (issue 21: the presets
#      on Sana were not measured). sana_runtime.{json,md}.
#   2. One linear layer at SD1.5 / SDXL / Flux shapes: 16 bit against the runtime's FP8 layer, its matmul and its
#      quantize apart (issue 22: why FP8 loses on UNets). fp8_linear.{json,md}.
#   3. SDPA kernels with PyTorch's own choice named (its "default" row; issue 21). sdpa_backends.{json,md}.
# Through the device tool: OUT=/tmp/res bash benchmarks/run_sana_fp8_linear.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  L=$(left 330)
  timeout "$L" python3 -u benchmarks/flux_runtime.py --arch sana-1600m --out "$OUT/sana" --budget-s $((L - 30)) \
    --configs "stock,runtime,runtime fp8,runtime cache3,preset balanced,preset fast"
  echo "[run] sana done at $((SECONDS - START)) s"
  L=$(left 500)
  timeout "$L" python3 -u benchmarks/runtime/fp8_linear.py --out "$OUT/fp8-linear"
  echo "[run] fp8 linear done at $((SECONDS - START)) s"
  L=$(left 555)
  timeout "$L" python3 -u benchmarks/runtime/sdpa_backends.py --out "$OUT/sdpa" --no-compile-check
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
