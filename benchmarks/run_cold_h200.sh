#!/usr/bin/env bash
# Issue 23 on one nvidia-h200, in two device calls (each under 10 minutes): PART=1 or PART=2.
#   1. SDXL with saved artifacts (<= 20 s target; 34.0 s before whole forwards): `accel precompile`'s path now also
#      saves the UNet's and the VAE decoder's whole compiled forwards (aot.py; the decoder's save retries with floats
#      as constants, since dynamo's restart to tensorify a float failed it on the GPU), then a fresh process on an
#      empty inductor cache loads them (cold_start.py --arch sdxl --cases precompile,artifacts).
#   2. The `balanced` preset's no-cache compile against cheaper ones (the <= 40 s target; 69.0 s): the VAE decoder left
#      eager under its CUDA graph, one launch configuration per pointwise kernel, no joint-graph pattern rewrites;
#      each a fresh process on an empty inductor cache, with its steady state (the 5% rule).
#   3. The presets' compile is now that lean one (`compile_options`): its first image and all-compiled time with
#      compile_background (first_image.py, 95 s of calls), its cold first call and steady state (compile_time.py
#      --variants balanced), and SD1.5's artifacts with the decoder's whole forward now saved too (cold_start.py).
#   4. (next session) Where the background compile's worker time goes: `balanced` + compile_background with 100 s of
#      calls, each worker's log (its timeline and dynamo's breakdown) kept in the record; then the same with the
#      compile in the thread alone (--compile-workers 0), to compare against the ~45-50 s the UNet takes in the foreground.
#   5. (seventh session) The background compile stage by stage: the UNet's 9 and the decoder's 5 stages each compiled
#      whole in parallel worker processes and loaded without a trace, with `balanced` in the foreground for the same
#      run's steady state, then the whole-forward background compile as before (--whole-forward).
#   6. Then the whole forward built by a second worker after the stages, the calls moving to it (two steps), and
#      `balanced` in the foreground for the same run's steady state.
#   7. The same two steps, the second (the whole forward) now a worker's inductor cache traced here, its worker under
#      the calls' grad mode (part 6's compiled a training graph), within the device time left (about 290 s). That run
#      also started the stage workers at accelerate(), since taken out (results/runtime/first-image/README.md, run 13).
#   8. (eighth session) The same two steps with the workers forked from one server that imported torch, inductor,
#      diffusers and accel once (started at accelerate()), each worker's stages loaded as it exits, and each compiled
#      component's GPU time per image; after the eager case (the first image of a warm machine, and eager's floor).
#   9. Stage calls in another layout than recorded now run the compiled code on the recorded strides, and the whole
#      forward compiles after the stages only where a stage call still found none; `balanced` in the foreground for
#      the same run's steady state (the 5% rule).
#  10. The compile workers' server started before the pipeline is built (as the app does), inductor's Triton-compile
#      pool forked in each worker (A/B against its default fresh processes, TORCHINDUCTOR_WORKER_START=subprocess),
#      20 steady calls each, `balanced` in the foreground with its components' GPU times.
#  11. Each worker's stages also run once on their recorded inputs as it exits (their kernels load then, not after the
#      last worker), the rest as in 10 (the forked pool), with `balanced` in the same run.
#  12. Part 11's background case alone, then 20 more calls that record which processes use the host's CPUs meanwhile
#      (the stages' host time beyond `balanced`'s is unexplained).
#  13. (ninth session) Where the fork server's 20 s of imports go (python -X importtime, twice: the machine's first
#      and a warm one), then part 11's background case and `balanced`, each with its threads' CPU time and py-spy's
#      samples over 20 more steady calls (carry .whl with py-spy's wheel), and the server's per-module imports.
#  14. The same with Python's bytecode compiled first, as pip leaves an install (the GPU machine's torch has none and
#      its Python writes none, PYTHONDONTWRITEBYTECODE=1: every process compiles torch's and diffusers' source as it
#      imports them; part 13's server spent 20.6 s so): compileall over the site-packages (timed), the server's
#      imports again, the eager case (a warm machine's first image), the background case and `balanced`.
#  15. The machine as it is (no bytecode), the server now keeping its bytecode in the suite's cache where none is
#      installed or written (process.bytecode_environment): the eager case, the background case twice (the first
#      server compiles the source into that cache, the second reads it), `balanced`, then SDXL's first image on the
#      background path (20 s of calls).
#  16. A machine's first start of the server with no bytecode anywhere, compiling the source it will import on every
#      core before its imports (commit a3c5c68, reverted after this run: no gain): the eager case, then the background
#      case twice, the server's bytecode folder emptied before each.
#  17. Saved artifacts with the background compile again (run 7's case, before the whole compiled forwards were saved
#      and before no server started ahead of a compile_cache): SD1.5's `accel precompile` artifacts, then the
#      background case on them in a fresh process on an empty inductor cache.
# Through the device tool: PART=1 OUT=/tmp/res bash benchmarks/run_cold_h200.sh   (carry .whl)
set -o pipefail
START=$SECONDS
source benchmarks/device_setup.sh
# Parts 13-15: the background case (20 steady calls, the server started while the pipeline is built), `balanced` in
# the foreground, the fork server's imports under `python -X importtime`, and a report written outside $OUT (8 files
# at most come back) summed up in this log.
background() {
  timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 110 --steady-calls 20 \
    --start-workers-first --out "$1"
  echo "[run] $1 done at $((SECONDS - START)) s"
}
balanced() {
  timeout "$2" python3 -u benchmarks/runtime/first_image.py --cases balanced --steady-calls 20 --out "$1"
  echo "[run] $1 done at $((SECONDS - START)) s"
}
server_imports() {
  TIMEFORMAT="[run] the server's imports, $1: %R s wall, %U s user, %S s sys"
  time python3 -X importtime -c "import accel.runtime.precompile, torch._inductor.compile_fx, accel.runtime.aot, \
diffusers.models, diffusers.models.unets.unet_2d_condition, diffusers.models.autoencoders.autoencoder_kl" \
    2> /tmp/imports.txt
  python3 benchmarks/runtime/import_times.py /tmp/imports.txt
}
summary() {
  python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['records'][0]; print({k: r.get(k) for k in \
('case', 'arch', 'first_image_s', 'all_switched_s', 'median_s', 'later_median_s', 'components_median_ms')}); \
print(r.get('server_log'))" "$1/first_image.json"
}
{
  if [ "${PART:-1}" = 1 ]; then
    timeout "$(left 580)" python3 -u benchmarks/runtime/cold_start.py --arch sdxl --cases precompile,artifacts \
      --budget "$(left 570)" --out "$OUT/sdxl-aot"
  elif [ "$PART" = 3 ]; then
    timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 95 --out "$OUT/first-lean"
    echo "[run] first image done at $((SECONDS - START)) s"
    timeout 130 python3 -u benchmarks/runtime/compile_time.py --variants balanced --budget 125 --out "$OUT/compile-preset"
    echo "[run] compile done at $((SECONDS - START)) s"
    timeout "$(left 580)" python3 -u benchmarks/runtime/cold_start.py --arch sd15 --cases precompile,artifacts \
      --budget "$(left 570)" --out "$OUT/sd15-aot"
  elif [ "$PART" = 5 ]; then
    timeout 60 python3 -c "import torch, diffusers; torch.zeros(1, device='cuda'); print('warm', torch.__version__)"
    timeout 260 python3 -u benchmarks/runtime/first_image.py --cases background,balanced --seconds 100 \
      --out "$OUT/first-stages"
    echo "[run] stages and balanced done at $((SECONDS - START)) s"
    timeout "$(left 580)" python3 -u benchmarks/runtime/first_image.py --cases background --whole-forward \
      --seconds "$(left 470)" --out "$OUT/first-whole"
  elif [ "$PART" = 6 ]; then
    timeout 60 python3 -c "import torch, diffusers; torch.zeros(1, device='cuda'); print('warm', torch.__version__)"
    timeout 340 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 300 --out "$OUT/two-step"
    echo "[run] two steps done at $((SECONDS - START)) s"
    timeout "$(left 580)" python3 -u benchmarks/runtime/first_image.py --cases balanced --out "$OUT/balanced"
  elif [ "$PART" = 8 ]; then
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out "$OUT/warm-eager"
    timeout 280 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 240 --out "$OUT/fork-server"
  elif [ "$PART" = 9 ]; then
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out "$OUT/warm-eager"
    timeout 200 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 150 --out "$OUT/stages"
    echo "[run] stages done at $((SECONDS - START)) s"
    timeout "$(left 560)" python3 -u benchmarks/runtime/first_image.py --cases balanced --out "$OUT/balanced"
  elif [ "$PART" = 10 ]; then
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out "$OUT/warm-eager"
    timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 110 --steady-calls 20 \
      --start-workers-first --out "$OUT/forked-pool"
    echo "[run] forked pool done at $((SECONDS - START)) s"
    TORCHINDUCTOR_WORKER_START=subprocess timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background \
      --seconds 110 --steady-calls 20 --start-workers-first --out "$OUT/subprocess-pool"
    echo "[run] subprocess pool done at $((SECONDS - START)) s"
    timeout "$(left 570)" python3 -u benchmarks/runtime/first_image.py --cases balanced --steady-calls 20 \
      --out "$OUT/balanced"
  elif [ "$PART" = 11 ]; then
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out "$OUT/warm-eager"
    timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 110 --steady-calls 20 \
      --start-workers-first --out "$OUT/stages"
    echo "[run] stages done at $((SECONDS - START)) s"
    timeout "$(left 400)" python3 -u benchmarks/runtime/first_image.py --cases balanced --steady-calls 20 \
      --out "$OUT/balanced"
  elif [ "$PART" = 12 ]; then
    timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 110 --steady-calls 20 \
      --start-workers-first --out "$OUT/stages-cpu"
  elif [ "$PART" = 13 ]; then
    python3 -c "import sys, os; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'cpus', os.cpu_count())"
    python3 - <<'PY'
import glob, os, torch
for name, folder in (("torch", os.path.dirname(torch.__file__)), ("diffusers", "/tmp/site/diffusers")):
    print(name, folder, "pyc files", len(glob.glob(folder + "/**/__pycache__/*.pyc", recursive=True)), "writable",
          os.access(folder, os.W_OK))
PY
    for i in 1 2; do server_imports "pass $i"; done
    which py-spy || echo "no py-spy"
    background "$OUT/stages"
    balanced "$OUT/balanced" "$(left 420)"
  elif [ "$PART" = 14 ]; then
    SITE=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
    TIMEFORMAT="[run] bytecode of $SITE and /tmp/site compiled: %R s wall"
    time python3 -m compileall -q -j 0 "$SITE" /tmp/site > /dev/null 2>&1
    server_imports "with bytecode"
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out /tmp/warm-eager
    background "$OUT/stages"
    balanced "$OUT/balanced" "$(left 520)"
  elif [ "$PART" = 15 ]; then
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out /tmp/warm-eager
    background /tmp/first-server
    summary /tmp/first-server
    echo "[run] bytecode kept: $(du -sh ~/.cache/diffusion-accel/pycache)"
    background "$OUT/stages"
    balanced "$OUT/balanced" 150
    timeout "$(left 560)" python3 -u benchmarks/runtime/first_image.py --arch sdxl --cases background --seconds 20 \
      --start-workers-first --out /tmp/sdxl
    summary /tmp/sdxl
  elif [ "$PART" = 16 ]; then
    timeout 100 python3 -u benchmarks/runtime/first_image.py --cases eager --out /tmp/warm-eager
    for i in 1 2; do
      rm -rf ~/.cache/diffusion-accel/pycache
      background "$OUT/first-start-$i"
    done
  elif [ "$PART" = 17 ]; then
    ART=$(mktemp -d)
    timeout 200 python3 -u benchmarks/runtime/cold_start.py --arch sd15 --cases precompile --artifacts "$ART" \
      --out "$OUT/precompile" --budget 190
    rm -f "$OUT"/precompile/*.npy
    timeout "$(left 380)" python3 -u benchmarks/runtime/first_image.py --cases background --seconds 40 \
      --steady-calls 20 --compile-cache "$ART/sd15" --out "$OUT/background-artifacts"
  elif [ "$PART" = 7 ]; then
    timeout 250 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 215 --out "$OUT/two-step"
  elif [ "$PART" = 4 ]; then
    timeout 60 python3 -c "import torch, diffusers; torch.zeros(1, device='cuda'); print('warm', torch.__version__)"
    timeout 150 python3 -u benchmarks/runtime/first_image.py --cases background --seconds 100 --out "$OUT/first-logs"
    echo "[run] with workers done at $((SECONDS - START)) s"
    timeout "$(left 580)" python3 -u benchmarks/runtime/first_image.py --cases background --seconds 130 \
      --compile-workers 0 --out "$OUT/first-thread"
  else
    timeout "$(left 580)" python3 -u benchmarks/runtime/compile_time.py \
      --variants balanced,balanced-unet,balanced-lean,balanced-lean-unet,balanced-lean-nopatterns \
      --budget "$(left 570)" --out "$OUT/compile-lean"
  fi
  echo "[run] took $((SECONDS - START)) s"
} 2>&1 | grep -v -i "warning\|torchvision" | tee "$OUT/run.log"
