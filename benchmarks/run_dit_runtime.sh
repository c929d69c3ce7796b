#!/usr/bin/env bash
# Issues 21 and 23 on two DiT architectures (random weights, bf16, 1024 px, 28 steps), one device call of at most
# 540 s, each architecture in its own flux_runtime.py process with its own timeout and --budget-s:
#   SD3-medium (CFG, batch 2): stock, runtime, runtime fp8, runtime fp8 cache3, runtime cache3, preset balanced,
#     preset fast, stock again: issue 21's SD3 targets (runtime alone >= 2x, best >= 4x). About 2 minutes.
#   FLUX.1-dev: stock, preset balanced, preset fast, runtime full, stock again: the presets as a user gets them, and
#     regional against full compilation in steady state (issue 23's 5% rule). About 3 minutes, 2 of them the full
#     compile, so it runs second, with whatever time SD3 left (at least 300 s).
# sd3.{json,md}, flux-presets.{json,md} and dit_runtime.log in $OUT. SD3_CONFIGS / FLUX_CONFIGS narrow the contenders.
#   bash benchmarks/run_dit_runtime.sh              (through the device tool, carry .whl)
#   SMOKE=1 bash benchmarks/run_dit_runtime.sh      (CPU check of every contender, tiny SD3 and Flux)
if [ "${SMOKE:-0}" != 1 ]; then source benchmarks/device_setup.sh; fi
set -o pipefail
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
SD3_CONFIGS=${SD3_CONFIGS:-stock,runtime,runtime fp8,runtime fp8 cache3,runtime cache3,preset balanced,preset fast,stock again}
FLUX_CONFIGS=${FLUX_CONFIGS:-stock,preset balanced,preset fast,runtime full,stock again}

# bench NAME ARCH CONFIGS LIMIT_S: the script skips contenders that would pass its budget (stock again still runs);
# the timeout is the hard stop (the rows so far are on disk).
bench() {
  local smoke=() limit=$4
  if [ "${SMOKE:-0}" = 1 ]; then smoke=(--smoke); fi
  echo "[run_dit_runtime] $1: $2, at most $limit s" | tee -a "$OUT/dit_runtime.log"
  timeout "$limit" python3 -u benchmarks/flux_runtime.py "${smoke[@]}" --arch "$2" --name "$1" --configs "$3" \
    --out "$OUT" --budget-s $((limit - 35)) 2>&1 | tee -a "$OUT/dit_runtime.log" | grep -v Warning | tail -16
  echo "[run_dit_runtime] $1 ended (rc ${PIPESTATUS[0]}) at $((SECONDS - START)) s" | tee -a "$OUT/dit_runtime.log"
}

bench sd3 sd3-medium "$SD3_CONFIGS" 220
bench flux-presets flux-dev "$FLUX_CONFIGS" $((530 - SECONDS))
echo "[run_dit_runtime] took $((SECONDS - START)) s after $START s of setup"
