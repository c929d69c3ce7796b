#!/usr/bin/env bash
# One nvidia-h200 call (about 4 minutes), issue 23: torch's aot_compile on the GPU machine's torch 2.11, where it is
# behind torch._dynamo.config.enable_aot_compile (off by default there; the fourth session's probe missed the switch
# and found no `aot_compile`). SD1.5 and SDXL UNets: aot_compile + save, then a fresh process on an empty inductor
# cache loads the saved function (load_compiled_function) and calls it: the first-call time the artifacts path
# spends mostly in dynamo's trace (SD1.5 UNet: 8.54 s with the portable artifacts, same script, fourth session).
# Through the device tool: OUT=/tmp/res bash benchmarks/run_aot_h200.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  timeout "$(left 330)" python3 -u benchmarks/runtime/aot_compile.py --arch sd15,sdxl --cases aot-save,aot-load \
    --timeout 160 --out "$OUT/aot"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
