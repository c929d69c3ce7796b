#!/usr/bin/env bash
# Issue 18, one device call (about 3-4 min): SD1.5-architecture DeepCache (interval 3, branch 0) eager at DDIM 50
# and DPM-Solver++ 20, ours against the DeepCache package, with more rounds than run_call_overhead.sh (6 each) gave:
# that run's DDIM 50 table was a tie within the host's drift. Each table runs in one process, its configs interleaved
# round by round in alternating order; the .md adds the paired per-round ratio of ours to the package's.
# Run through the device tool: bash benchmarks/run_deepcache_interleaved.sh   (carry .whl: diffusers, DeepCache)
# The per-step op counts behind these timings come from `call_overhead.py --count-ops` (CPU, no device needed).
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -c "import DeepCache" || { echo "DeepCache package not importable: carry .whl with its wheel"; exit 1; }
bench() {  # bench SECONDS NAME ARGS...: one harness run in its own process (writes NAME.json / .md / .png)
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 -m apps.cli bench --arch sd15 --out "$OUT/$name" "$@" 2>&1 | grep -v Warning
  rm -f "$OUT/$name.png"  # at most 8 files come back
  echo "[run_deepcache_interleaved] $name done at $((SECONDS - START)) s"
}
CONFIGS=stock,deepcache-pkg,deepcache
bench 170 sd15-ddim50-deepcache-r12 --scheduler ddim --steps 50 --interleave --runs "${RUNS_DDIM:-12}" --configs "$CONFIGS"
bench 60 sd15-dpmpp20-deepcache-r8 --scheduler dpmpp_2m --steps 20 --interleave --runs "${RUNS_DPM:-8}" --configs "$CONFIGS"
echo "[run_deepcache_interleaved] took $((SECONDS - START)) s"
