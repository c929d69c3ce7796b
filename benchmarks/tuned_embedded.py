"""Search tuned step schedules for the embedded model and record what each search cost.

For each solver and step budget the schedule is searched on calibration prompts and seeds
("a picture of a {class}", seeds from 10000) and saved as JSON; the search's loss before and
after, its seconds and denoiser calls go to `tuned.json` / `tuned.md`. By default the loss is what
the judge measures: the mean over calibration images of 10 log10 of each decoded image's squared
error to the 200-step reference (minus the mean PSNR, in dB), and UniPC's per-step orders are
searched with its sigmas (S^3). `--init default,karras,logsnr` runs one search from each and keeps
the best (3x the cost; on CPU at 5 steps the Karras / log-SNR starts ended in worse minima);
`--objective mse --space latent --no-orders` is the original latent-space search.
The OLSS solver (`samplers.olss`, fitted per-step coefficients) comes in three variants: "olss"
searches the sigmas with the coefficients refitted for each candidate, "olss-fit" fits them on the
default sigmas only, and "olss-on-2m" on this run's tuned dpmpp_2m sigmas (list dpmpp_2m first).
Judging the schedules on held-out prompts (PSNR to a 200-step reference, adherence, Frechet
distance, next to the default schedule and diffusers' schedulers) is
`benchmarks/samplers_quality.py`'s job, which reads the saved files.

    python benchmarks/tuned_embedded.py --device cuda --calibration 40 --out benchmarks/results/tuned-embedded

`--model <name or pipeline folder>` searches another model's schedules: the embedded DiT
(`mini-sd3-cifar10`, flow matching; the files record their flow form; refused until its trained
weights are in the folder), and
`--schedules <folder>` saves them into that folder's `tuned_schedules/` (e.g. the model folder itself,
where `make_scheduler(..., tuned=name, model_dir=<model>)` finds them by name):

    python benchmarks/tuned_embedded.py --model mini-sd3-cifar10 --solvers dpmpp_2m,olss \
        --device cuda --schedules accel/models/mini-sd3-cifar10 --out benchmarks/results/tuned-dit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from accel.embedded import CIFAR10_CLASSES, load_embedded_pipeline
from samplers.tuned import OBJECTIVES, SPACES, load_tuned_schedule, save_tuned_schedule, tune_pipeline_schedule

# (name, sampler, options, search arguments): DPM-Solver++ 2M and UniPC at diffusers' default order 2,
# and the OLSS coefficient solver on searched sigmas, on the default ones and on the tuned 2M ones
SOLVERS = (("dpmpp_2m", "dpmpp_2m", {}, {}), ("unipc_bh2", "unipc_bh2", {"order": 2}, {}),
           ("olss", "olss", {}, {}), ("olss-fit", "olss", {}, {"passes": 0}),
           ("olss-on-2m", "olss", {}, {"passes": 0}))
SOLVER_NAMES = tuple(name for name, *_ in SOLVERS)


def load_model(model: str | None, device: str):
    """The embedded UNet model (None), or the pipeline named `model` (the embedded DiT, `mini-sd3-cifar10`)
    or in folder `model`, float32. The embedded DiT, by name or folder, raises FileNotFoundError while it
    has no trained transformer weights: schedules fitted on random weights would say nothing."""
    if model is None:
        return load_embedded_pipeline(device=device)
    from diffusers import DiffusionPipeline

    from accel.embedded_dit import EMBEDDED_DIT_NAME, is_embedded_dit, resolve_model

    folder = Path(resolve_model(EMBEDDED_DIT_NAME if is_embedded_dit(model) else model))
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline folder at {folder} (model_index.json missing)")
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None, pipe=None) -> int:
    """The command line; `pipe`: search on this loaded pipeline instead of loading `--model`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="mini-sd3-cifar10 or a pipeline folder (default: the embedded UNet model)")
    parser.add_argument("--schedules", default=None,
                        help="save the files into this folder's tuned_schedules/ (default: <out>/schedules)")
    parser.add_argument("--steps", default="5,6,8")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES), help=f"some of {SOLVER_NAMES}")
    parser.add_argument("--calibration", type=int, default=40, help="calibration prompts (seeds 10000+)")
    parser.add_argument("--passes", type=int, default=12, help="pattern-search passes")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--objective", default="psnr", choices=OBJECTIVES)
    parser.add_argument("--space", default="image", choices=SPACES)
    parser.add_argument("--init", default="default", help="initial schedules, comma-separated: one search from each")
    parser.add_argument("--no-orders", action="store_true", help="keep the solver's own per-step orders")
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--history", default="3", help="olss: denoiser outputs each step combines (or 'all')")
    parser.add_argument("--ridge", type=float, default=0.0, help="olss: pull towards DPM-Solver++(2M)'s coefficients")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/tuned-embedded")
    args = parser.parse_args(argv)
    solvers = [next(s for s in SOLVERS if s[0] == name) for name in args.solvers.split(",") if name in SOLVER_NAMES]
    if not solvers or len(solvers) != len(args.solvers.split(",")):
        parser.error(f"--solvers {args.solvers!r}: valid choices are {SOLVER_NAMES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedules = Path(args.schedules) if args.schedules else out / "schedules"
    if pipe is None:
        pipe = load_model(args.model, args.device)
    calibration = [f"a picture of a {CIFAR10_CLASSES[i % 10]}" for i in range(args.calibration)]
    command = "python " + " ".join(sys.argv)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    unit = "dB" if args.objective == "psnr" else "squared error"
    measure = ("mean over images of 10 log10 of each image's squared error (minus the mean PSNR)"
               if args.objective == "psnr" else "squared error pooled over all inputs")
    lines = [f"Tuned schedules for {args.model or 'the embedded model'}, searched on {len(calibration)} calibration "
             f"prompts (seed 10000), guidance {args.guidance}, {device}; loss: {measure} of the final "
             f"{'decoded image' if args.space == 'image' else 'latent'} to a {args.reference_steps}-step reference "
             f"({unit}). Searches start from {args.init.replace(',', ', ')}.", "",
             "| solver | steps | loss, default schedule | loss, tuned | from | orders | search (s) | denoiser calls "
             "| file |",
             "|---|---:|---:|---:|---|---|---:|---:|---|"]
    rows = []
    # step budgets in the order given, both solvers each: a run cut short keeps the first budgets
    for n in (int(s) for s in args.steps.split(",")):
        for name, solver, options, search in solvers:
            start = time.perf_counter()
            search = dict(search)
            if solver == "olss":
                search.update(history=None if args.history == "all" else int(args.history), ridge=args.ridge)
            if name == "olss-on-2m":
                search["init_sigmas"] = load_tuned_schedule(f"dpmpp_2m-{n}", schedules).sigmas
            tuned = tune_pipeline_schedule(pipe, prompts=calibration, sampler=solver, num_steps=n,
                                           guidance_scale=args.guidance, seed=10_000,
                                           **{"passes": args.passes, **search},
                                           init_schedule=tuple(args.init.split(",")), sampler_options=options,
                                           objective=args.objective, space=args.space,
                                           reference_steps=args.reference_steps,
                                           search_orders=not args.no_orders and solver.startswith("unipc"))
            if name == "olss-on-2m":
                tuned.init_schedule = f"tuned dpmpp_2m-{n}"
            path = save_tuned_schedule(tuned, schedules, f"{name}-{n}")
            rows.append({"solver": name, "steps": n, "loss_init": tuned.loss_init, "loss_tuned": tuned.loss_tuned,
                         "init_schedule": tuned.init_schedule, "orders": tuned.orders,
                         "search_seconds": round(time.perf_counter() - start, 1),
                         "search_denoiser_calls": tuned.search_denoiser_calls, "file": str(path)})
            lines.append(f"| {name} | {n} | {tuned.loss_init:.4g} | {tuned.loss_tuned:.4g} | {tuned.init_schedule} | "
                         f"{tuned.orders or ''} | {rows[-1]['search_seconds']} | {tuned.search_denoiser_calls} | "
                         f"`{path.name}` |")
            print(lines[-1], flush=True)
            # written after every search, so a run cut short keeps the finished ones
            meta = {"command": command, "device": device, "objective": args.objective, "space": args.space,
                    "init": args.init, "calibration": args.calibration, "reference_steps": args.reference_steps}
            (out / "tuned.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
            (out / "tuned.md").write_text("\n".join(lines + ["", f"Command: `{command}`"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
