#!/usr/bin/env bash
# One H100 call: torch's CUDA-graph API on this machine, the SDXL distillation smoke (issues 7, 8) and
# regional compilation's cold first call per variant (issue 5).   bash benchmarks/run_h100_b.sh
source benchmarks/device_setup.sh
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 benchmarks/runtime/probe_graph_api.py > "$OUT/graph_api.txt" 2>&1; head -4 "$OUT/graph_api.txt"
timeout 210 python3 benchmarks/pruning/sdxl_distill_smoke.py --out "$OUT" 2>&1 | grep -v Warning | tail -15
echo "[distill smoke done at $((SECONDS - START)) s]"
python3 benchmarks/runtime/compile_time.py --variants default,blocks-only-static,static --budget $((560 - (SECONDS - START))) --out "$OUT" 2>&1 | tail -8
echo "[done at $((SECONDS - START)) s]"
