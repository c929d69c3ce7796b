#!/usr/bin/env bash
# Tuned schedules on the embedded model (issue 4): search 5-, 6- and 8-step schedules for DPM-Solver++ 2M
# and fit the OLSS coefficient solver (samplers/olss.py: its sigmas searched with the coefficients refitted,
# and fitted on the default and on the tuned 2M sigmas) on 40 calibration prompts, measured on decoded
# images (mean PSNR), then judge them on 1000 held-out prompts against DPM-Solver++ 2M's default schedule
# and diffusers' DPMSolverMultistep. About 5-7 min on an H100; the search stops at 330 s and the judge
# takes what it finished (5 steps first). UniPC's tuned schedules (per-step orders) were searched and
# judged by the previous run of this script (results/tuned-embedded/h100-2026-11-23b):
# SOLVERS=dpmpp_2m,unipc_bh2 CANDIDATES="dpmpp_2m,unipc_bh2 order 2,diffusers dpm++2m,diffusers unipc" repeats it.
# Run through the device tool:  bash benchmarks/run_tuned.sh   (carry .whl)
# CPU check of the whole script with tiny sizes:  SMOKE=1 bash benchmarks/run_tuned.sh
set -o pipefail
if [ "${SMOKE:-0}" != 1 ]; then source benchmarks/device_setup.sh; else export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; fi
START=$SECONDS
OUT=${OUT:-out}; mkdir -p "$OUT"
R=/tmp/tuned-run; rm -rf $R; mkdir -p $R
if [ "${SMOKE:-0}" = 1 ]; then
  SEARCH=(--device cpu --threads 1 --calibration 2 --steps 3 --passes 1 --reference-steps 6 --init default,karras)
  JUDGE=(--device cpu --n 10 --batch-size 10 --steps 3 --reference-steps 6)
  SEARCH_S=900; END_S=2400  # CPU: the classifier's features of the 10,000 CIFAR-10 test images take minutes
else
  SEARCH=(--device cuda --calibration 40 --steps 5,6,8)
  JUDGE=(--device cuda --n 1000 --steps 5,6,8)
  SEARCH_S=330; END_S=530
fi
pack() { (cd $R && tar czf "$OUT/tuned-results.tgz" .); echo "[run_tuned] $* at $((SECONDS - START)) s"; }

timeout $SEARCH_S python3 benchmarks/tuned_embedded.py "${SEARCH[@]}" --solvers "${SOLVERS:-dpmpp_2m,olss,olss-fit,olss-on-2m}" --out "$R/tuned-embedded" 2>&1 \
  | grep -v Warning | tee "$R/search.log" | grep "^|"
pack "search done"
timeout $((END_S - (SECONDS - START))) python3 benchmarks/samplers_quality.py "${JUDGE[@]}" \
  --candidates "${CANDIDATES:-dpmpp_2m,diffusers dpm++2m}" \
  --tuned "$R/tuned-embedded/schedules/tuned_schedules" --out "$R/samplers-quality" 2>&1 \
  | grep -v Warning > "$R/judge.log"
tail -n 12 "$R/samplers-quality/samplers-quality.md" 2>/dev/null || tail -n 20 "$R/judge.log"
pack "judge done"
