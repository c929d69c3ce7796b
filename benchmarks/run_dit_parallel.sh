#!/usr/bin/env bash
# One nvidia-h200-x2 call (not run yet; about 6 minutes), issue 21's parallel part on 2 GPUs: Flux context
# parallelism (Ulysses) and SD3 CFG parallelism, alone and with the DiT runtime, against one GPU in the same job.
# Through the device tool (kind nvidia-h200-x2):  OUT=/tmp/res bash benchmarks/run_dit_parallel.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  timeout 560 torchrun --nproc-per-node 2 benchmarks/dit_parallel.py --out "$OUT/dit-parallel"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
