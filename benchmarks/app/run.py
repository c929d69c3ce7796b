"""The app's comparison on a GPU (issue 11): what the page would show, without a browser.

`ComparisonApp.compare` on CUDA for the embedded model and the SD1.5 architecture (random weights):
no acceleration, DeepCache, the `fast` preset's sampler alone and the `fast` preset with its compiled
runtime (torch.compile + CUDA graphs, warmed up by an untimed first call), each run twice to show what
a second request costs after `restore` (recompilation or not). Then two requests from two threads at
once (the lock serialises them; both must finish with the images they get alone), and, where gradio
and gradio_client are installed, the same through the served app's queue.

    python benchmarks/app/run.py --out out/app           # on the GPU (benchmarks/app/run.sh)
    python benchmarks/app/run.py --smoke --out out/app   # CPU, 2 steps, end to end
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from apps.gradio_app import KEEP_SAMPLER, ComparisonApp, Controls, numbers_markdown


def log(message: str) -> None:
    print(f"[app] {message}", flush=True)


def configs(smoke: bool) -> list[tuple[str, dict]]:
    sampler_steps = 2 if smoke else 12
    return [
        ("none", dict(sampler=KEEP_SAMPLER)),
        ("deepcache-i3", dict(sampler=KEEP_SAMPLER, cache="deepcache", cache_interval=3)),
        ("dpmpp_2m-karras-12", dict(sampler="dpmpp_2m", sampler_steps=sampler_steps, schedule="karras")),
        ("preset-fast", dict(preset="fast")),
    ]


def row(model: str, name: str, repeat: int, result, wall_s: float) -> dict:
    return {
        "model": model, "config": name, "repeat": repeat, "label": result.label,
        "baseline_s": result.baseline_s, "accelerated_s": result.accelerated_s, "speedup": result.speedup,
        "first_call_s": result.first_call_s, "psnr_db": None if math.isinf(result.psnr_db) else result.psnr_db,
        "identical": math.isinf(result.psnr_db), "ssim": result.ssim, "steps": [result.baseline_steps, result.accelerated_steps],
        "verdict": result.verdict, "notes": result.notes, "request_wall_s": wall_s,
    }


def run_model(app: ComparisonApp, model: str, prompt: str, steps: int, smoke: bool, deadline: float, out: Path,
              rows: list[dict], save) -> list[dict]:
    for name, change in configs(smoke):
        for repeat in (1, 2):
            if time.monotonic() > deadline:
                log(f"{model} {name}: skipped, out of time")
                return rows
            tic = time.perf_counter()
            result = app.compare(Controls(prompt, steps=steps, **change))
            rows.append(row(model, name, repeat, result, time.perf_counter() - tic))
            save()
            log(f"{model} {name} #{repeat}: {result.baseline_s * 1000:.1f} ms -> {result.accelerated_s * 1000:.1f} ms "
                f"({result.speedup:.2f}x), PSNR {rows[-1]['psnr_db']}, first call {result.first_call_s}, "
                f"request {rows[-1]['request_wall_s']:.1f} s")
            if repeat == 1:
                result.baseline.save(out / f"{model}-{name}-baseline.png")
                result.accelerated.save(out / f"{model}-{name}-accelerated.png")
                (out / f"{model}-{name}.md").write_text(numbers_markdown(result) + "\n")
    return rows


def concurrent(app: ComparisonApp, prompt: str, steps: int) -> dict:
    """Two requests at once from two threads: both finish, each with the images it gets alone."""
    requests = [Controls(prompt, steps=steps, seed=1, sampler=KEEP_SAMPLER, cache="deepcache"),
                Controls(prompt, steps=steps, seed=2, sampler="dpmpp_2m", sampler_steps=steps)]
    alone = [app.compare(c) for c in requests]
    results, errors = [None, None], []

    def worker(i):
        try:
            results[i] = app.compare(requests[i])
        except Exception as err:  # recorded in the report
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    same = [r is not None and np.array_equal(np.asarray(r.baseline), np.asarray(a.baseline))
            and np.array_equal(np.asarray(r.accelerated), np.asarray(a.accelerated)) for r, a in zip(results, alone)]
    report = {"completed": sum(r is not None for r in results), "errors": errors, "same_images_as_alone": same,
              "wall_s": time.perf_counter() - tic}
    log(f"two threads at once: {report}")
    return report


def served(app: ComparisonApp, prompt: str, steps: int) -> dict:
    """The same two requests through the Gradio queue of the launched app (where gradio is installed)."""
    try:
        import gradio  # noqa: F401
        from gradio_client import Client
    except ImportError as err:
        log(f"served app: skipped ({err})")
        return {"skipped": str(err)}
    from apps.gradio_app import launch

    demo = launch(app, port=None, prevent_thread_lock=True)
    try:
        client = Client(demo.local_url, verbose=False)
        jobs = [client.submit(*Controls(prompt, steps=steps, seed=s, sampler=KEEP_SAMPLER, cache="deepcache").__dict__.values(),
                              api_name="/generate") for s in (1, 2)]
        outputs = [job.result(timeout=300) for job in jobs]
        report = {"completed": len(outputs), "speedup_lines": [next(l for l in o[2].splitlines() if "speed-up" in l) for o in outputs]}
    except Exception as err:  # recorded in the report
        report = {"error": repr(err)}
    finally:
        demo.close()
    log(f"served app, two requests: {report}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/app"))
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 steps, embedded model only")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no new request after this many seconds")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device; use --smoke on a CPU machine")
        return 2
    if args.smoke:
        torch.set_num_threads(1)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "command": " ".join(sys.argv), "rows": []}

    def save():  # after every request: a run cut off by the time limit keeps what it measured
        report["elapsed_s"] = time.monotonic() - start
        (args.out / "app-gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    app = ComparisonApp.load(None, device=device)  # the embedded model, float16 on CUDA
    steps = 2 if args.smoke else 20
    run_model(app, "embedded", "a photo of a horse", steps, args.smoke, deadline, args.out, report["rows"], save)
    report["concurrent"] = concurrent(app, "a photo of a ship", steps)
    report["served"] = served(app, "a photo of a ship", steps)
    save()

    if not args.smoke and time.monotonic() < deadline - 120:
        from apps.bench_archs import build_pipeline

        del app
        pipe = build_pipeline("sd15", device="cuda", dtype=torch.float16)
        pipe.set_progress_bar_config(disable=True)
        sd15 = ComparisonApp(pipe, model_name="SD1.5 layout, random weights")
        run_model(sd15, "sd15", "a photo of an astronaut riding a horse", 20, False, deadline, args.out, report["rows"], save)
    save()
    lines = ["| model | config | # | baseline (ms) | accelerated (ms) | speed-up | first call (s) | PSNR (dB) | request (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        psnr = "identical" if r["identical"] else f"{r['psnr_db']:.1f}"
        first = "-" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        lines.append(f"| {r['model']} | {r['config']} | {r['repeat']} | {r['baseline_s'] * 1000:.1f} | "
                     f"{r['accelerated_s'] * 1000:.1f} | {r['speedup']:.2f}x | {first} | {psnr} | {r['request_wall_s']:.1f} |")
    (args.out / "app-gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = report["concurrent"]["completed"] == 2 and all(report["concurrent"]["same_images_as_alone"])
    log(f"done in {report['elapsed_s']:.0f} s; concurrent requests {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
