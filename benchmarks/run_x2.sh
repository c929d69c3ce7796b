#!/usr/bin/env bash
# One nvidia-h200-x2 call: patch / CFG parallelism (issue 9), then batch throughput on 1 and 2
# GPUs (issue 10). Through the device tool:  bash benchmarks/run_x2.sh   (carry .whl and .data)
OUT=${OUT:-out}; mkdir -p "$OUT"
T0=$(date +%s)
OUT=$OUT PARALLEL_TIMEOUT=330 bash benchmarks/run_parallel.sh | tail -n 40
echo "[$(( $(date +%s) - T0 )) s] parallel done"
source benchmarks/device_setup.sh > /dev/null
LEFT=$(( 570 - ($(date +%s) - T0) ))
echo "batch throughput: $LEFT s left"
timeout $LEFT python3 benchmarks/batch_throughput.py --arch sd15 --nprocs 1,2 --n 128 --n-stock 10 --batch-size 8 \
  --preset balanced --out /tmp/batch-x2 2>&1 | tail -n 10
cp /tmp/batch-x2/throughput.md /tmp/batch-x2/throughput.json "$OUT/" 2>/dev/null
(cd /tmp/batch-x2 && tar czf "$OUT/batch-logs.tgz" batch-*.log) 2>/dev/null
echo "[$(( $(date +%s) - T0 )) s] done"; ls -la "$OUT"
