#!/usr/bin/env bash
# Encoder propagation's calibrated default on the embedded model (issue 6), < 3 min on one H100: 1000
# CIFAR-10 prompts at DPM-Solver++ 20 and DDIM 50 steps, uncached / default / default + parallel decoding /
# the paper's key set: latency, PSNR, adherence, Frechet distance. JSON and a table into $OUT.
# Through the device tool (carry .whl):  bash benchmarks/cache/encprop_quality.sh
# On CPU, end to end with tiny sizes:    SMOKE=1 bash benchmarks/cache/encprop_quality.sh
set -o pipefail
START=$SECONDS
OUT=${OUT:-out/encprop}; mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  export PYTHONPATH=$PWD OMP_NUM_THREADS=1
  timeout 900 python3 benchmarks/cache/encprop_quality.py --smoke --out "$OUT" "$@" 2>&1 | tee "$OUT/encprop.log" | grep "^\[encprop\]\|^|\|Error\|error"
else
  source benchmarks/device_setup.sh
  export ACCEL_CIFAR10_DIR=${ACCEL_CIFAR10_DIR:-$PWD/.data}
  timeout 400 python3 benchmarks/cache/encprop_quality.py --device cuda --n 1000 --out "$OUT" "$@" 2>&1 | tee "$OUT/encprop.log" | grep -v "Warning\|warn("
fi
STATUS=$?
echo "[encprop_quality.sh] exit $STATUS after $((SECONDS - START)) s; $(ls "$OUT")"
exit $STATUS
