"""Search tuned step schedules for the embedded model and record what each search cost.

For each solver and step budget the schedule is searched on calibration prompts and seeds
("a picture of a {class}", seeds from 10000) and saved as JSON; the search's latent-space loss
before and after, its seconds and denoiser calls go to `tuned.json` / `tuned.md`. Judging the
schedules on held-out prompts (PSNR to a 200-step reference, adherence, Frechet distance, next
to the default schedule and diffusers' schedulers) is `benchmarks/samplers_quality.py`'s job,
which reads the saved files.

    python benchmarks/tuned_embedded.py --device cuda --calibration 40 --out benchmarks/results/tuned-embedded
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from accel.embedded import CIFAR10_CLASSES, load_embedded_pipeline
from samplers.tuned import save_tuned_schedule, tune_pipeline_schedule

# (solver, options): DPM-Solver++ 2M and UniPC at diffusers' default order 2
SOLVERS = (("dpmpp_2m", {}), ("unipc_bh2", {"order": 2}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,6,8")
    parser.add_argument("--calibration", type=int, default=40, help="calibration prompts (seeds 10000+)")
    parser.add_argument("--passes", type=int, default=12, help="pattern-search passes")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/tuned-embedded")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_embedded_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    calibration = [f"a picture of a {CIFAR10_CLASSES[i % 10]}" for i in range(args.calibration)]
    command = "python " + " ".join(sys.argv)
    lines = [f"Tuned schedules for the embedded model, searched on {len(calibration)} calibration prompts (seed "
             f"10000), guidance {args.guidance}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
             "loss: mean squared distance of the final latent to a 200-step reference.", "",
             "| solver | steps | loss, default schedule | loss, tuned | search (s) | denoiser calls | file |",
             "|---|---:|---:|---:|---:|---:|---|"]
    rows = []
    for solver, options in SOLVERS:
        for n in (int(s) for s in args.steps.split(",")):
            start = time.perf_counter()
            tuned = tune_pipeline_schedule(pipe, prompts=calibration, sampler=solver, num_steps=n,
                                           guidance_scale=args.guidance, seed=10_000, passes=args.passes,
                                           init_schedule="default", sampler_options=options)
            path = save_tuned_schedule(tuned, out / "schedules", f"{solver}-{n}")
            rows.append({"solver": solver, "steps": n, "loss_init": tuned.loss_init, "loss_tuned": tuned.loss_tuned,
                         "search_seconds": round(time.perf_counter() - start, 1),
                         "search_denoiser_calls": tuned.search_denoiser_calls, "file": str(path)})
            lines.append(f"| {solver} | {n} | {tuned.loss_init:.4g} | {tuned.loss_tuned:.4g} | "
                         f"{rows[-1]['search_seconds']} | {tuned.search_denoiser_calls} | `{path.name}` |")
            print(lines[-1], flush=True)
            # written after every search, so a run cut short keeps the finished ones
            (out / "tuned.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
            (out / "tuned.md").write_text("\n".join(lines + ["", f"Command: `{command}`"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
