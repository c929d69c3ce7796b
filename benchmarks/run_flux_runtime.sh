#!/usr/bin/env bash
# Issues 21 and 22 on the FLUX.1-dev architecture (random weights, bf16, 1024 px, 28 steps, batch 1), one device
# call of at most 540 s: flux_runtime.py's stock, compiled runtime (SDPA and cuDNN-pinned), FP8, FP8 + fixed cache,
# fixed caches, stock again; flux_runtime.{json,md,log} in $OUT. CONFIGS=a,b narrows the contenders.
#   bash benchmarks/run_flux_runtime.sh              (through the device tool, carry .whl)
#   SMOKE=1 bash benchmarks/run_flux_runtime.sh      (CPU check of every contender, tiny Flux, about 90 s)
if [ "${SMOKE:-0}" != 1 ]; then source benchmarks/device_setup.sh; fi
set -o pipefail
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  python3 -u benchmarks/flux_runtime.py --smoke --out "$OUT" ${CONFIGS:+--configs "$CONFIGS"} 2>&1 \
    | tee "$OUT/flux_runtime.log" | grep -v Warning | tail -25
  echo "[run_flux_runtime] smoke took $((SECONDS - START)) s"
  exit
fi
# The script skips contenders that would pass its budget; the timeout is the hard stop (its rows are on disk).
timeout $((530 - SECONDS)) python3 -u benchmarks/flux_runtime.py --out "$OUT" --budget-s $((495 - SECONDS)) \
  ${CONFIGS:+--configs "$CONFIGS"} 2>&1 | tee "$OUT/flux_runtime.log" | grep -v Warning | tail -30
echo "[run_flux_runtime] took $((SECONDS - START)) s after $((START)) s of setup"
