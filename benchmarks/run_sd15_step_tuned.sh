#!/usr/bin/env bash
# One nvidia-h200 call (not run yet; about 8 minutes), issue 22's SD1.5 UNet step (<= 4.5 ms with FP8; 6.27 ms best so
# far): the `balanced` runtime at 16 bit, with cuDNN's autotuner alone, with it and inductor's options for conv-heavy
# UNets (1x1 convolutions as matmuls, coordinate-descent tuning, no epilogue fusion: diffusers' torch.compile guide),
# and FP8 on the wide layers with both. SD1.5 architecture, 512 px, DPM-Solver++ 20, CFG batch 2, one process.
# Through the device tool: OUT=/tmp/res bash benchmarks/run_sd15_step_tuned.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  timeout "$(left 560)" python3 -u benchmarks/quantize.py --out "$OUT/sd15-tuned" --quality-n 0 --arch sd15 --unet-calls 3 \
    --configs "stock,compiled 16-bit,compiled 16-bit cudnn-bench,compiled 16-bit tuned,compiled fp8 wide tuned"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
