#!/usr/bin/env bash
# One device call (about 9.5 minutes), each part in its own process with its own timeout (issues 21 and 23):
#   1. The every-4 fixed DiT cache's quality on the embedded DiT (CIFAR-10 prompts, 1000 images), next to every 3
#      (the `fast` preset's), same run (dit_cache_quality.py; needs .data carried).
#   2. SD3-medium architecture, 1024 px, 28 steps, CFG: stock, runtime, FP8 + every 3, FP8 + every 4 (flux_runtime.py).
#   3. SDXL `balanced` with lora_hotswap: a LoRA swap and a weight change, the next image and dynamo's counters
#      (lora_swap.py --arch sdxl).
# Run through the device tool: OUT=/tmp/res bash benchmarks/run_sd3_every4_sdxl_lora.sh   (carry .whl, .data)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
left() { echo $(($1 - (SECONDS - START))); }
{
  timeout 130 python3 -u benchmarks/dit_cache_quality.py --device cuda --n 1000 --batch-size 250 --budget-s 90 \
    --contenders "accel every 3 F1B0 taylor1,accel every 4" --out "$OUT/dit-quality" 2>&1 | grep -a -v -e 'it/s'
  echo "[run] dit quality done at $((SECONDS - START)) s"
  timeout 230 python3 -u benchmarks/flux_runtime.py --arch sd3-medium --name sd3-every4 --out "$OUT/sd3" \
    --configs "stock,runtime,runtime fp8 cache3,runtime fp8 cache4" --budget-s 200
  echo "[run] sd3 done at $((SECONDS - START)) s"
  L=$(left 575)
  timeout "$L" python3 -u benchmarks/runtime/lora_swap.py --arch sdxl --out "$OUT/lora-sdxl" --budget $((L - 15))
  rm -f "$OUT"/*/*.npy
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
