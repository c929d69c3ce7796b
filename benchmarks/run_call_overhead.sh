#!/usr/bin/env bash
# Issue 18, one device call (about 5 min): the per-call overhead of the session and hooks before and after the
# call-plan restructuring, then SD1.5-architecture DeepCache (interval 3, branch 0) eager at DDIM 50 and
# DPM-Solver++ 20 against the DeepCache package, each table in one process. Every table interleaves its configs
# round by round: the device host's eager speed drifts by up to 40% within a minute (first run, 2026-12-02).
#   .before/  a copy of the packages as they were before (accel without models/, samplers, pruning, distill, apps):
#             d=$(mktemp -d) && git worktree add "$d" 0e76178 && mkdir -p .before &&
#             for p in accel samplers pruning distill apps; do cp -r "$d/$p" .before/; done && rm -rf .before/accel/models
# Run through the device tool: bash benchmarks/run_call_overhead.sh   (carry .whl with diffusers and DeepCache, and .before)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
OUT=${OUT:-out}; mkdir -p "$OUT"
SITE=/tmp/site
for label in before after; do
  root=$PWD; [ "$label" = before ] && root=$PWD/.before
  PYTHONPATH=$SITE:$root timeout 150 python3 benchmarks/call_overhead.py --device cuda --steps 20 --rounds 5 --label "$label" \
    --out "$OUT/call-overhead-$label.json" 2>&1 | grep -v Warning
  echo "[run_call_overhead] $label done at $((SECONDS - START)) s"
done
if python3 -c "import DeepCache" 2>/dev/null; then PEER=",deepcache-pkg"; else PEER=""; echo "DeepCache package not importable"; fi
bench() {  # bench SECONDS NAME ARGS...: one harness run in its own process (writes NAME.json / .md / .png)
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 -m apps.cli bench --arch sd15 --out "$OUT/$name" "$@" 2>&1 | grep -v Warning
  rm -f "$OUT/$name.png"  # at most 8 files come back
  echo "[run_call_overhead] $name done at $((SECONDS - START)) s"
}
bench 150 sd15-ddim50-deepcache --scheduler ddim --steps 50 --interleave --runs 6 --configs "stock${PEER},deepcache"
bench 100 sd15-dpmpp20-deepcache --scheduler dpmpp_2m --steps 20 --interleave --runs 6 --configs "stock${PEER},deepcache"
echo "[run_call_overhead] took $((SECONDS - START)) s"
