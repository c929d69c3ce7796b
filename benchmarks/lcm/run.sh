#!/usr/bin/env bash
# LCM / LCM-LoRA on the embedded model (issue 8), < 9 min on one H100: distil an LCM-LoRA and a full LCM
# UNet (140 s each, bf16), then adherence, Frechet distance and latency at 1/2/4/8 steps next to the
# teacher at 20 DPM-Solver++ steps. Through the device tool (carry .whl):  bash benchmarks/lcm/run.sh
# On CPU, end to end with tiny sizes:  SMOKE=1 bash benchmarks/lcm/run.sh
# Other arguments go to run.py, e.g. the LoRA alone at 4 and 2 steps:  bash benchmarks/lcm/run.sh --variants lora --steps-list 4 2
set -o pipefail
START=$SECONDS
OUT=${OUT:-out/lcm}; mkdir -p "$OUT"
ARGS=()
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1 || ARGS+=("$arg"); done
if [ "${SMOKE:-0}" = 1 ]; then
  export PYTHONPATH=$PWD OMP_NUM_THREADS=1
  timeout 900 python3 benchmarks/lcm/run.py --smoke --out "$OUT/work" "${ARGS[@]}" 2>&1 | tee "$OUT/lcm.log" | grep "^\[lcm\]\|^|\|Target\|Error\|error"
else
  source benchmarks/device_setup.sh
  export ACCEL_CIFAR10_DIR=${ACCEL_CIFAR10_DIR:-$PWD/.data}
  timeout 520 python3 benchmarks/lcm/run.py --out "$OUT/work" "${ARGS[@]}" 2>&1 | tee "$OUT/lcm.log" | grep -v "Warning\|warn("
fi
STATUS=$?
cp "$OUT/work/lcm.md" "$OUT/work/lcm.json" "$OUT/" 2>/dev/null
# one tar of what is small enough to come back (files over ~15 MB are dropped): results, the LoRA in fp16
# (~7 MB; fp32 is 14.6 MB) and the distillation summaries; the full student (26 MB) stays behind
tar -czf "$OUT/lcm-artifacts.tar.gz" -C "$OUT/work" --ignore-failed-read lcm.json lcm.md lora-fp16/pytorch_lora_weights.safetensors \
  lora/lcm_distill.json full/lcm_distill.json 2>/dev/null
echo "[run.sh] exit $STATUS after $((SECONDS - START)) s; $(ls "$OUT")"
rm -rf "$OUT/work"
exit $STATUS
