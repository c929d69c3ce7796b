#!/usr/bin/env bash
# One device call (under 10 min) of quality on the trained embedded DiT (mini-sd3-cifar10), each part in its own
# process with its own time limit, so that a part cut short leaves the others' results:
#   1. issue 20: flow samplers x steps against diffusers' flow schedulers, tuned flow schedules and OLSS fitted on the
#      DiT (benchmarks/flow_samplers.py, 1,000 prompts);
#   2. issue 21: the DiT caches' quality cost, ours against Cache-DiT and diffusers' hooks (benchmarks/dit_cache_quality.py);
#   3. issue 22: FP8 / INT8 on the DiT (benchmarks/quantize.py --quality-model dit, the quality part alone).
# Run through the device tool: bash benchmarks/run_dit_quality.sh   (carry .whl with diffusers 0.42.1 and cache_dit
# (it ran with transformers 5.24 carried too; 5.17 loads the models alike since the CLIP file's names were fixed), and .data with CIFAR-10's test.tar.gz; move mini-sd-cifar10's UNet weights out of the tree
# for the 64 MiB limit: the DiT does not use them). PARTS: the parts to run (default "flow,cache,quantize"; ONLY_FLOW=1
# is PARTS=flow); FLOW_LIMIT, FLOW_BATCH, FLOW_ARGS: part 1's time limit (280 s), batch (250) and further flags (e.g.
# "--steps 8,10 --tuned-steps 8,10"); CACHE_LIMIT, CACHE_BUDGET: part 2's (200 s, 150 s). $OUT receives
# results.tar.gz (every part's folder) and run.log.
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
export ACCEL_CIFAR10_DIR=$PWD/.data
OUT=${OUT:-out}; R=/tmp/dit-quality; mkdir -p "$OUT" "$R"
PARTS=${PARTS:-flow,cache,quantize}; [ -n "$ONLY_FLOW" ] && PARTS=flow
has() { [[ ",$PARTS," == *",$1,"* ]]; }
part() {  # part SECONDS NAME COMMAND...: one part in its own process, its log in $R/NAME.log
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "[run_dit_quality] $name: exit $? at $((SECONDS - START)) s"
  tail -n 40 "$R/$name.log" | grep -a -v -e 'it/s' -e Warning
}
{
has flow && part ${FLOW_LIMIT:-280} flow-samplers python3 benchmarks/flow_samplers.py --device cuda --n 1000 --batch-size ${FLOW_BATCH:-250} $FLOW_ARGS --out "$R/flow-samplers"
has cache && part ${CACHE_LIMIT:-200} dit-cache-quality python3 benchmarks/dit_cache_quality.py --device cuda --n 1000 --batch-size 250 --budget-s ${CACHE_BUDGET:-150} --out "$R/dit-cache-quality"
has quantize && part 60 quantize-dit python3 benchmarks/quantize.py --quality-model dit --configs "" --out "$R/quantize-dit"
echo "[run_dit_quality] took $((SECONDS - START)) s"
} 2>&1 | tee "$OUT/run.log"
tar czf "$OUT/results.tar.gz" -C "$R" .
