#!/usr/bin/env bash
# Issue 7 on the device: BK-SDM speed table (SD1.5, SDXL) and embedded-model pruning + KD, < 9 min in all.
# Device run:  bash benchmarks/pruning/run.sh          (carry .whl; CIFAR-10 archives in .data/)
# CPU check:   SMOKE=1 OUT=/tmp/pruning-smoke bash benchmarks/pruning/run.sh
set -o pipefail
START=$SECONDS
if [ "${SMOKE:-0}" = 1 ]; then
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
  FLAGS=--smoke
else
  source benchmarks/device_setup.sh
  FLAGS=""
fi
export ACCEL_CIFAR10_DIR=${ACCEL_CIFAR10_DIR:-$PWD/.data}
OUT=${OUT:-out/pruning}; mkdir -p "$OUT"
timeout 500 python3 benchmarks/pruning/measure.py $FLAGS --out "$OUT/run" 2>&1 | tee "$OUT/pruning.log" | grep -v "Warning\|torchvision"
STATUS=$?
# At most 8 files come back: the JSON, the markdown, the log and one tar of the distilled students (fp16).
cp "$OUT/run/pruning_results.json" "$OUT/run/pruning_results.md" "$OUT/run/students.tar" "$OUT/" 2>/dev/null
rm -rf "$OUT/run"
echo "[pruning] exit $STATUS after $((SECONDS - START)) s"
