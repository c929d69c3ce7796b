"""Tuned step schedules on the embedded model: does a searched schedule beat the solver's default
schedule at 5 to 8 steps (issue 4's target: by >= 1 dB PSNR to a high-step reference)?

For each step budget the schedule is searched on calibration prompts and seeds, then judged on
held-out seeds (and other prompts) against a 200-step DPM-Solver++ 3M Karras reference, next to
the default schedule of the same solver and diffusers' own schedulers in the same run. The
search cost (seconds, denoiser calls) is reported with each schedule.

    python benchmarks/tuned_embedded.py --device cuda --per-class 10 --out benchmarks/results/tuned-embedded
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from accel.embedded import CIFAR10_CLASSES, load_embedded_pipeline
from samplers.evaluate import format_table, sampler_table
from samplers.tuned import TunedSchedule, save_tuned_schedule, tune_pipeline_schedule, tuned_schedule_path

SOLVERS = ("dpmpp_2m", "unipc_bh2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,6,8")
    parser.add_argument("--per-class", type=int, default=10, help="held-out prompts per CIFAR-10 class")
    parser.add_argument("--calibration", type=int, default=20, help="calibration prompts (seeds 10000+)")
    parser.add_argument("--passes", type=int, default=12, help="pattern-search passes")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/tuned-embedded")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the schedules already saved under OUT/schedules instead of searching again")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_embedded_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    steps = [int(s) for s in args.steps.split(",")]

    # Calibration: other templates than the held-out "a photo of a {c}", other noise seeds.
    calibration = [f"a picture of a {CIFAR10_CLASSES[i % 10]}" for i in range(args.calibration)]
    tuned_rows, candidates = [], [
        ("diffusers dpm++2m", "dpmpp_2m", "default", {"backend": "diffusers"}),
        ("diffusers unipc", "unipc_bh2", "default", {"backend": "diffusers"}),
        ("dpmpp_2m", "dpmpp_2m", "default", {}),
        ("unipc_bh2 order 2", "unipc_bh2", "default", {"order": 2}),
    ]
    schedules = {}
    for solver in SOLVERS:
        options = {"order": 2} if solver == "unipc_bh2" else {}
        for n in steps:
            start = time.perf_counter()
            saved = tuned_schedule_path(out / "schedules", f"{solver}-{n}")
            if args.reuse and saved.exists():
                tuned = TunedSchedule.load(saved)
                schedules[(solver, n)] = saved
                tuned_rows.append({"solver": solver, "steps": n, "sigmas": tuned.sigmas, "loss_init": tuned.loss_init,
                                   "loss_tuned": tuned.loss_tuned, "search_seconds": round(tuned.search_seconds, 1),
                                   "search_denoiser_calls": tuned.search_denoiser_calls, "file": str(saved)})
                continue
            if args.reuse:
                print(f"no saved schedule for {solver} {n} steps: skipped", flush=True)
                continue
            tuned = tune_pipeline_schedule(pipe, prompts=calibration, sampler=solver, num_steps=n,
                                           guidance_scale=args.guidance, seed=10_000, passes=args.passes,
                                           init_schedule="default", sampler_options=options)
            path = save_tuned_schedule(tuned, out / "schedules", f"{solver}-{n}")
            schedules[(solver, n)] = path
            tuned_rows.append({"solver": solver, "steps": n, "sigmas": tuned.sigmas, "loss_init": tuned.loss_init,
                               "loss_tuned": tuned.loss_tuned, "search_seconds": round(time.perf_counter() - start, 1),
                               "search_denoiser_calls": tuned.search_denoiser_calls, "file": str(path)})
            print(f"tuned {solver} {n} steps: latent loss {tuned.loss_init:.4g} -> {tuned.loss_tuned:.4g}, "
                  f"{tuned_rows[-1]['search_seconds']} s, {tuned.search_denoiser_calls} denoiser calls", flush=True)

    prompts = [f"a photo of a {c}" for c in CIFAR10_CLASSES for _ in range(args.per_class)]
    rows = sampler_table(pipe, candidates=candidates, steps=steps, prompt=prompts, guidance_scale=args.guidance)
    for (solver, n), path in schedules.items():
        options = {"order": 2} if solver == "unipc_bh2" else {}
        label = f"{solver} tuned" + (" order 2" if options else "")
        rows += sampler_table(pipe, candidates=[(label, solver, "tuned", {"tuned": str(path), **options})],
                              steps=[n], prompt=prompts, guidance_scale=args.guidance)

    by = {(r["label"], r["steps"]): r["psnr_db"] for r in rows}
    gains = []
    for solver, default_label in (("dpmpp_2m", "dpmpp_2m"), ("unipc_bh2", "unipc_bh2 order 2")):
        tuned_label = f"{solver} tuned" + (" order 2" if solver == "unipc_bh2" else "")
        for n in steps:
            if (tuned_label, n) not in by:
                continue
            gains.append({"solver": solver, "steps": n, "default_db": by[(default_label, n)],
                          "tuned_db": by[(tuned_label, n)], "gain_db": by[(tuned_label, n)] - by[(default_label, n)]})
    command = "python " + " ".join(sys.argv)
    meta = {"prompts": len(prompts), "calibration_prompts": len(calibration), "guidance": args.guidance,
            "device": args.device, "reference": "dpmpp_3m karras 200 steps", "command": command,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (out / "tuned.json").write_text(json.dumps({"meta": meta, "rows": rows, "tuned": tuned_rows, "gains": gains},
                                               indent=2) + "\n")
    lines = [f"PSNR (dB) to a dpmpp_3m karras 200-step reference, embedded model, {len(prompts)} held-out prompts "
             f"(seed 0), guidance {args.guidance}, {meta['gpu'] or args.device}. Tuned schedules searched on "
             f"{len(calibration)} other prompts (seed 10000).", "", format_table(rows), "",
             "| solver | steps | default schedule | tuned | gain (dB) | search (s) | search denoiser calls |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    searches = {(t["solver"], t["steps"]): t for t in tuned_rows}
    for g in gains:
        t = searches[(g["solver"], g["steps"])]
        lines.append(f"| {g['solver']} | {g['steps']} | {g['default_db']:.2f} | {g['tuned_db']:.2f} | "
                     f"{g['gain_db']:+.2f} | {t['search_seconds']} | {t['search_denoiser_calls']} |")
    lines += ["", f"Command: `{command}`"]
    (out / "tuned.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
