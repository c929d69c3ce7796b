#!/usr/bin/env bash
# One nvidia-h200 call (not run yet; about 8 minutes), issue 23:
#   1. The clean first image of `balanced` + compile_background (<= 3 s SD1.5 / <= 5 s SDXL), channels-last now
#      converted at the end of the first call: a first process warms the machine (the first process on a fresh
#      machine is seconds slower), then each case, no artifacts, no profiler; SD1.5 with 30 s of calls during the
#      compile (first_image.py --cases background --seconds 30), SDXL the first image only.
#   2. The `balanced` runtime's compile swapped, each in a fresh process on an empty inductor cache (compile_time.py):
#      whole stages of UNet and VAE decoder compiled in worker processes, the preset's full compile, and the regional
#      blocks: time to the end of the first call (= steady state reached) and the steady state (the 5% rule).
#   3. Which trace-skipping APIs the GPU machine's torch has (aot_compile, dynamo's caching_precompile).
# Through the device tool: OUT=/tmp/res bash benchmarks/run_next_h200.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
{
  timeout 60 python3 -c "import torch, diffusers; torch.zeros(1, device='cuda'); print('warm', torch.__version__)"
  timeout 100 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 30 --out "$OUT/first-clean"
  timeout 100 python3 -u benchmarks/runtime/first_image.py --arch sdxl --cases background --seconds 0 \
    --out "$OUT/first-clean-sdxl"
  echo "[run] first images done at $((SECONDS - START)) s"
  timeout "$(left 560)" python3 -u benchmarks/runtime/compile_time.py --variants balanced-stages,balanced,balanced-regional \
    --budget "$(left 545)" --out "$OUT/compile-variants"
  echo "[run] compile variants done at $((SECONDS - START)) s"
  timeout 30 python3 -c "
import torch, torch._dynamo.config as c
print('torch', torch.__version__, 'caching_precompile', hasattr(c, 'caching_precompile'))
print('compiled function has aot_compile', hasattr(torch.compile(lambda x: x + 1), 'aot_compile'))
print('load_compiled_function', hasattr(torch.compiler, 'load_compiled_function'))"
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
