#!/usr/bin/env bash
# The app on the GPU (issue 11), < 9 min on one H100: ComparisonApp.compare on CUDA for the embedded
# model and the SD1.5 architecture (no acceleration, DeepCache, the fast sampler, the `fast` preset with
# torch.compile + CUDA graphs, each requested twice), two requests at once from two threads, and through
# the served app's queue where gradio is installed. Through the device tool (carry .whl):
#   bash benchmarks/app/run.sh
# On CPU, end to end with 2 steps:  SMOKE=1 bash benchmarks/app/run.sh   (or --smoke)
set -o pipefail
START=$SECONDS
OUT=${OUT:-out/app}; mkdir -p "$OUT/work"
if [ "${SMOKE:-0}" = 1 ] || [ "${1:-}" = "--smoke" ]; then
  export PYTHONPATH=$PWD OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
  timeout 600 python3 benchmarks/app/run.py --smoke --out "$OUT/work" 2>&1 | tee "$OUT/app.log" | grep "^\[app\]\|^|\|Error"
else
  source benchmarks/device_setup.sh
  export GRADIO_ANALYTICS_ENABLED=False
  timeout 450 python3 benchmarks/app/run.py --out "$OUT/work" 2>&1 | tee "$OUT/app.log" | grep "^\[app\]\|^|\|Error"
fi
STATUS=$?
cp "$OUT/work/app-gpu.json" "$OUT/work/app-gpu.md" "$OUT/" 2>/dev/null
tar -czf "$OUT/app-images.tar.gz" -C "$OUT/work" --ignore-failed-read . 2>/dev/null
rm -rf "$OUT/work"
echo "[run.sh] exit $STATUS after $((SECONDS - START)) s; $(ls "$OUT")"
exit $STATUS
