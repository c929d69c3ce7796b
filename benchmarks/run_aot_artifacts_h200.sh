#!/usr/bin/env bash
# One nvidia-h200 call (about 3 minutes), issue 23's "with saved artifacts" target (first compiled image <= 10 s for
# SD1.5 in a fresh process on an empty inductor cache): `accel precompile` now also saves each compiled module's whole
# forward with torch's aot_compile (accel/runtime/aot.py; torch 2.11 has it behind enable_aot_compile), and the
# artifacts case loads it, skipping dynamo's trace (SD1.5 `balanced`, 512 px; before: 15.9 s, 12.6 s on another day).
# Through the device tool: OUT=/tmp/res bash benchmarks/run_aot_artifacts_h200.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  timeout "$(left 330)" python3 -u benchmarks/runtime/cold_start.py --arch sd15 --cases precompile,artifacts \
    --budget 300 --out "$OUT/aot-artifacts"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
