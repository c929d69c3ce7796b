#!/usr/bin/env bash
# Patch / CFG parallelism (issue #9) on 2 GPUs against 1, SDXL architecture at 2048 and 1024 px,
# plus PSNR on the embedded model. Run through the device tool on nvidia-h200-x2 (carry .whl):
#   bash benchmarks/run_parallel.sh            # about 3-5 minutes
#   SMOKE=1 bash benchmarks/run_parallel.sh    # tiny SDXL-like UNet, CPU, gloo, 2 processes
set -o pipefail
if [ "${SMOKE:-0}" = "1" ]; then
  export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  NPROC=2
else
  source benchmarks/device_setup.sh
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
fi
export ACCEL_CIFAR10_DIR=${ACCEL_CIFAR10_DIR:-$PWD/.data}
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout "${PARALLEL_TIMEOUT:-530}" torchrun --standalone --nproc-per-node "$NPROC" benchmarks/parallel_bench.py --out "$OUT" "$@" \
  2>&1 | tee "$OUT/parallel.log" | grep -v -i "warn"
