"""A first image before the compile ends (issue 23): `balanced` with `compile_background=True` against `balanced`.

    source benchmarks/device_setup.sh && python3 benchmarks/runtime/first_image.py --out $OUT/first     # H200
    ... first_image.py --arch sdxl --cases background --seconds 20 --out $OUT/first-sdxl              # SDXL, 1024 px
    python benchmarks/runtime/first_image.py --smoke --out /tmp/first                                  # CPU

Each case runs in a fresh process with its own empty TORCHINDUCTOR_CACHE_DIR (a new machine): SD1.5 architecture
(random weights), fp16, 512 px (`--arch sdxl`: SDXL, 1024 px), `preset="balanced"` (full torch.compile and CUDA
graphs of denoiser, VAE decoder and text encoders), CFG 7.5, seed 0.

    background  the preset with `compile_background=True`: calls back to back for `--seconds` (default 90; it ends
                sooner, 6 calls after every component switched), each
                with its start (from `accelerate()`), its latency and how many components run compiled code; the
                time to the first image, to each component's switch (its log line) and to the last one; the steady
                median (last 5 calls); the first image's PSNR against the last (eager against compiled)
    balanced    the preset as it is: the first call (compile and capture), then the median of 5 calls
    eager       the preset's sampler alone (no runtime): diffusers' eager first call in a fresh process (CUDA and cuDNN
                start-up, lazy kernel loading), then the median of 5 calls: the floor of any first image

Each call's record has each compiled component's GPU time (`components_ms`, CUDA events around its calls) and each
record their medians over the steady calls (`--steady-calls`, default 5). `--start-workers-first` starts the compile
workers' server before the pipeline is built, as the app does before loading its model (times still count from
`accelerate()`).

`--smoke` runs both on the CPU with the embedded model at 32 px, the denoiser alone compiled, without CUDA graphs,
for 60 s. The report (`first_image.json`, `first_image.md`) is rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import _pipeline  # noqa: E402
from compile_time import REPO, fresh_process  # noqa: E402

CASES = ("background", "balanced", "eager")
PROMPT, GUIDANCE, STEADY_CALLS = "a photo of a cat", 7.5, 5


class _Lines(logging.Handler):
    """The suite's log lines of this process, with their time from `start`."""

    def __init__(self, start: float):
        super().__init__(logging.INFO)
        self.start, self.lines = start, []

    def emit(self, record):
        self.lines.append((round(time.perf_counter() - self.start, 3), f"{record.name}: {record.getMessage()}"))


def _stat_seconds(stat: Path) -> tuple[float, str]:
    """(CPU seconds so far, the kernel's name) from a /proc `stat` file of a process or a thread."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    comm, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
    fields = rest.split()
    return (int(fields[11]) + int(fields[12])) / ticks, comm


def _cpu_seconds() -> dict:
    """Each process's CPU seconds so far (Linux /proc), by pid: (seconds, its command line's start)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            seconds, _ = _stat_seconds(entry / "stat")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except (OSError, ValueError, IndexError):
            continue
        found[entry.name] = (seconds, command)
    return found


def _thread_seconds() -> dict:
    """This process's threads' CPU seconds so far (Linux /proc/self/task), by thread id: (seconds, name), the name
    Python's where the thread is one of its own, else the kernel's (CUDA's, inductor's, OpenMP's threads)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    found = {}
    for entry in Path("/proc/self/task").glob("[0-9]*"):
        try:
            seconds, comm = _stat_seconds(entry / "stat")
        except (OSError, ValueError, IndexError):
            continue
        found[entry.name] = (seconds, names.get(int(entry.name), comm))
    return found


def _busiest(before: dict, after: dict, seconds: float, count: int = 8, id: str = "pid",
             label: str = "command") -> list[dict]:
    """The processes (or threads) that used the most CPU between two readings (`_cpu_seconds`, `_thread_seconds`)
    `seconds` apart."""
    used = [(after[key][0] - before.get(key, (0.0, ""))[0], key, after[key][1]) for key in after]
    return [{id: key, "cpu_share": round(cpu / seconds, 3), label: name}
            for cpu, key, name in sorted(used, reverse=True)[:count] if cpu > 0]


def _sampler(seconds: float):
    """py-spy sampling this process for `seconds` without stopping it (where the py-spy binary is on PATH), in the
    background; the returned callable waits for it and returns each thread's samples and its most frequent stacks
    (innermost 8 frames): who holds the host time beside the calls."""
    binary = shutil.which("py-spy")
    if binary is None:
        return lambda: None
    raw = Path(tempfile.mkdtemp(prefix="pyspy-")) / "raw.txt"
    process = subprocess.Popen([binary, "record", "--pid", str(os.getpid()), "--duration", str(max(1, int(seconds))),
                                "--rate", "250", "--format", "raw", "--threads", "--nonblocking",
                                "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish():
        try:
            _, err = process.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            return {"error": "py-spy did not finish"}
        if not raw.is_file():
            return {"error": (err or "")[-500:]}
        threads, stacks = Counter(), Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if not count.isdigit() or not frames:
                continue
            threads[frames[0]] += int(count)
            stacks[(frames[0], ";".join(f.split(" (")[0] for f in frames[1:][-8:]))] += int(count)
        return {"threads": dict(threads.most_common(12)),
                "stacks": [{"thread": t, "samples": n, "frames": f} for (t, f), n in stacks.most_common(25)]}
    return finish


def child(case: str, args: argparse.Namespace, seconds: float, out: Path) -> dict:
    """One case in this process, with the options `main` was given (they pass through to the child unchanged)."""
    import numpy as np
    import torch

    import accel
    from accel.quality.metrics import psnr
    from accel.runtime import background_compile_report, background_compiles, compile_cache_report
    from accel.runtime import _modules as compiled_modules

    arch, smoke = args.arch, args.smoke
    if args.whole_forward:  # the background compile as before the stages: each component's whole forward in a worker
        from accel.runtime import compile as compile_mod

        compile_mod.STAGE_LISTS = ()
    channels_last = {"preset": None, "on": True, "off": False}[args.channels_last]
    loading = time.perf_counter()
    if args.start_workers_first and case == "background":  # as the app does before loading its model
        from accel.runtime import start_compile_workers

        start_compile_workers()
    pipe, config, size = _pipeline("embedded" if smoke else arch, smoke)
    loaded_s = time.perf_counter() - loading
    if case == "background":
        config = config.replace(runtime=replace(config.runtime, compile_background=True,
                                                compile_workers=args.compile_workers, compile_cache=args.compile_cache))
    if case == "eager":
        config = accel.AccelConfig(sampler=config.sampler, runtime=accel.RuntimeConfig(channels_last=True)
                                   if channels_last else None)
    elif channels_last is not None:
        config = config.replace(runtime=replace(config.runtime, channels_last=channels_last))
    modules = compiled_modules(pipe, config.runtime.compiled_components) if config.runtime is not None else []
    start = time.perf_counter()
    lines = _Lines(start)
    logging.getLogger("accel").addHandler(lines)
    logging.getLogger("accel").setLevel(logging.INFO)

    # Each compiled component's GPU time per image (CUDA events around its calls): where the stages' cost lies
    events: dict[str, list] = {type(m).__name__: [] for m in modules}

    def timed(module):
        name = type(module).__name__

        def before(*_):
            events[name].append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            events[name][-1][0].record()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(lambda *_: events[name][-1][1].record())

    if not smoke:
        for module in modules:
            timed(module)

    def generate():
        began = time.perf_counter()
        for calls in events.values():
            calls.clear()
        image = pipe(prompt=PROMPT, guidance_scale=GUIDANCE, height=size, width=size, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(0)).images
        if not smoke:
            torch.cuda.synchronize()
        generate.components_ms = {name: round(sum(a.elapsed_time(b) for a, b in calls), 2)
                                  for name, calls in events.items()}
        return image, began - start, time.perf_counter() - began

    accel.accelerate(pipe, config)
    record = {"case": case, "arch": arch, "size": size, "steps": config.sampler.num_steps, "torch": torch.__version__,
              "device": "cpu" if smoke else torch.cuda.get_device_name(), "accelerate_s": time.perf_counter() - start,
              "channels_last": config.runtime is not None and config.runtime.channels_last,
              "pipeline_build_s": round(loaded_s, 3), "workers_started_first": bool(args.start_workers_first)}
    if args.profile_first:  # where the first call's time goes: Python functions and the torch ops they call, by own time
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        first, at, latency = profiler.runcall(generate)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        record["first_call_profile"] = text.getvalue().splitlines()[-40:]
    else:
        first, at, latency = generate()
    record["first_image_s"] = at + latency  # from accelerate() to the first image
    timeline = [{"start_s": round(at, 3), "latency_s": round(latency, 4)}]
    image = first
    if case == "background":
        after_switch = 0  # calls since every component switched and no compile runs: the steady median's, then the end
        while time.perf_counter() - start < seconds and after_switch <= args.steady_calls:
            reports = [background_compile_report(m) or {} for m in modules]
            image, at, latency = generate()
            timeline.append({"start_s": round(at, 3), "latency_s": round(latency, 4),
                             "compiled_before": sum(r.get("compiled", 0) for r in reports),
                             **({"components_ms": generate.components_ms} if not smoke else {})})
            switched = sum("switches to its compiled code" in line for _, line in lines.lines)
            after_switch += switched == len(modules) and background_compiles(pipe) != "running"
        switches = [t for t, line in lines.lines if "switches to its compiled code" in line]
        # Components built stage by stage move on to their whole forward once a worker built it too: the stages'
        # steady state is the calls between the last stage switch and the first whole one (each first call after a
        # switch, which captures its graphs, left out).
        wholes = [t for t, line in lines.lines if "switches to its whole compiled forward" in line]
        if len(switches) == len(modules):
            staged = [t["latency_s"] for t in timeline if max(switches) < t["start_s"] < min(wholes or [float("inf")])]
            record.update(staged_median_s=statistics.median(staged[1:]) if len(staged) > 1 else None,
                          staged_calls=len(staged))
        record.update(whole_switch_s=wholes, all_whole_s=max(wholes) if wholes and len(wholes) == len(modules) else None)
        failed = [line for _, line in lines.lines if "background compile" in line and "failed" in line]
        record.update(switch_s=switches, all_switched_s=max(switches) if len(switches) == len(modules) else None,
                      compile_s=[background_compile_report(m) for m in modules], failed=failed,
                      artifacts=compile_cache_report(pipe),
                      psnr_first_vs_last_db=float(psnr(*(torch.from_numpy(i[0]).permute(2, 0, 1) for i in (first, image)))))
        for report in record["compile_s"]:  # each worker's timeline and dynamo breakdown, in place of its path
            for worker in (report or {}).get("workers", []):
                path = Path(worker["log"]) if worker.get("log") else None
                if path is not None and path.is_dir():  # a stage-by-stage compile: a log per worker process (its
                    # timeline, then dynamo's breakdown)
                    worker["log"] = {p.name: p.read_text()[:3000] for p in sorted(path.glob("worker-*.log"))}
                else:
                    worker["log"] = path.read_text()[-4000:] if path is not None and path.is_file() else None
        from accel.runtime.precompile import ForkServer

        server = ForkServer._running  # its imports, module by module, and when it was ready
        record["server_log"] = (server.folder / "server.log").read_text()[-3000:] if server is not None else None
        times = [t["latency_s"] for t in timeline[-args.steady_calls:]]
    else:
        times = []
        for _ in range(args.steady_calls):
            image, at, latency = generate()
            timeline.append({"start_s": round(at, 3), "latency_s": round(latency, 4),
                             **({"components_ms": generate.components_ms} if not smoke else {})})
            times.append(latency)
    if not smoke and Path("/proc/self/stat").is_file():  # who else uses the host's CPUs meanwhile
        before, threads, began = _cpu_seconds(), _thread_seconds(), time.perf_counter()
        sampled = _sampler(args.steady_calls * 0.15)
        later = []  # the same number of calls again, later: whether the steady state was still settling
        for _ in range(args.steady_calls):
            later.append(generate()[2])
        spent = time.perf_counter() - began
        record["later_median_s"] = statistics.median(later)
        record["later_latencies_ms"] = [round(t * 1e3, 1) for t in later]
        record["busiest_during_steady"] = _busiest(before, _cpu_seconds(), spent)
        record["threads_during_steady"] = _busiest(threads, _thread_seconds(), spent, 10, id="tid", label="name")
        record["py_spy_during_steady"] = sampled()
    if not smoke:  # each compiled component's median GPU time per image over the steady calls
        steady = [t["components_ms"] for t in timeline[-len(times):] if "components_ms" in t]
        record["components_median_ms"] = {name: statistics.median(c[name] for c in steady) for name in events} \
            if steady else None
    record.update(median_s=statistics.median(times), timeline=timeline, log=[f"{t} s {l}" for t, l in lines.lines[-40:]])
    np.save(out / f"{arch}-{case}-last.npy", image[0])
    return record


def write_report(out: Path, records: list[dict], meta: dict) -> None:
    (out / "first_image.json").write_text(json.dumps({**meta, "records": records}, indent=1))

    def cell(value, scale=1.0, digits=1):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    rows = ["| case | channels-last | accelerate() s | first image s | all switched s | stages' median ms | "
            "all on whole forwards s | steady median ms | calls | wall s |", "| --- " * 10 + "|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['case']} | {(r['error'].strip().splitlines() or ['failed'])[-1][:160]} |" + " |" * 8)
            continue
        rows.append(f"| {r['case']} | {'yes' if r.get('channels_last') else 'no'} | {cell(r['accelerate_s'], digits=2)} | "
                    f"{cell(r['first_image_s'])} | "
                    f"{cell(r.get('all_switched_s'))} | {cell(r.get('staged_median_s'), 1e3)} | "
                    f"{cell(r.get('all_whole_s'))} | {cell(r['median_s'], 1e3)} | {len(r['timeline'])} | "
                    f"{cell(r.get('wall_s'))} |")
    text = [f"# First image before the compile ends ({meta['mode']}, {meta['arch']})", "", f"`{meta['command']}`", "",
            "Each case a fresh process on an empty inductor cache; `balanced` preset, CFG 7.5, seed 0.", "", *rows, ""]
    for r in records:
        if r.get("case") == "background" and "timeline" in r:
            text.append(f"- switches at {r['switch_s']} s; PSNR of the first (eager) image against the last: "
                        f"{r['psnr_first_vs_last_db']:.2f} dB; failures: {r['failed'] or 'none'}")
            text.append("- timeline (start s: latency ms): " + ", ".join(
                f"{t['start_s']:.1f}: {t['latency_s'] * 1e3:.0f}" for t in r["timeline"]))
        if r.get("later_latencies_ms"):
            text.append(f"- {r['case']}: {len(r['later_latencies_ms'])} later calls (threads' CPU read, py-spy "
                        f"sampling): median {r['later_median_s'] * 1e3:.1f} ms; {r['later_latencies_ms']}")
        if r.get("first_call_profile"):
            text += [f"", f"First call of {r['case']}, cProfile by own time:", "", "```",
                     *r["first_call_profile"], "```"]
    (out / "first_image.md").write_text("\n".join(text) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--seconds", type=float, default=None, help="the background case's timeline (default: 90, "
                        "60 with --smoke)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--compile-workers", type=int, default=None, help="the background case's compile_workers "
                        "(default: None, a worker process per component on a GPU; 0: the thread compiles it all)")
    parser.add_argument("--channels-last", default="preset", choices=("preset", "on", "off"),
                        help="the runtime's channels_last in every case (preset: as the preset has it; the eager case: "
                        "'on' adds RuntimeConfig(channels_last=True) alone, to time NHWC eager convolutions' first call)")
    parser.add_argument("--profile-first", action="store_true", help="cProfile the first call (its 30 functions of "
                        "most own time go into the report; the profiler slows Python)")
    parser.add_argument("--compile-cache", default=None, help="the background case's RuntimeConfig.compile_cache: a "
                        "folder of artifacts (`accel precompile`, `cold_start.py --cases precompile --artifacts DIR`)")
    parser.add_argument("--whole-forward", action="store_true", help="the background case compiles each component's "
                        "whole forward in one worker, the thread tracing it after (as before the stage-by-stage build)")
    parser.add_argument("--start-workers-first", action="store_true", help="the background case starts the compile "
                        "workers' server before building the pipeline (`accel.runtime.start_compile_workers`), as the "
                        "app does before loading its model; times still count from accelerate()")
    parser.add_argument("--steady-calls", type=int, default=STEADY_CALLS, help="calls in each steady median (the "
                        "background case's, after every component switched)")
    parser.add_argument("--smoke", action="store_true", help="the embedded model on the CPU at 32 px, no CUDA graphs")
    parser.add_argument("--child", default=None, choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = args.seconds if args.seconds is not None else (60.0 if args.smoke else 90.0)
    if args.child:
        sys.path.insert(0, str(REPO))
        print("RECORD " + json.dumps(child(args.child, args, seconds, out)), flush=True)
        os._exit(0)  # a background compile still running (a short --seconds) is not waited for at exit
    import diffusers
    import torch

    meta = {"command": shlex.join(["python3", *sys.argv]), "mode": "smoke, CPU" if args.smoke else "GPU",
            "arch": "embedded" if args.smoke else args.arch,
            "torch": torch.__version__, "diffusers": diffusers.__version__}
    records = []
    for case in args.cases.split(","):
        began = time.perf_counter()
        child_args = [*sys.argv[1:], "--child", case]  # every option as given; the child runs `case` alone
        record = {"case": case, **fresh_process(__file__, child_args, tempfile.mkdtemp(prefix=f"inductor-{case}-"),
                                                seconds + 600)}
        record["wall_s"] = time.perf_counter() - began
        records.append(record)
        write_report(out, records, meta)
        print(f"{case}: " + (record["error"][-300:] if "error" in record else
              f"first image {record['first_image_s']:.1f} s, all switched {record.get('all_switched_s')} s "
              f"(stages' median {record.get('staged_median_s')}), all whole {record.get('all_whole_s')} s, "
              f"steady median {record['median_s'] * 1e3:.1f} ms"), flush=True)
    print(f"wrote {out / 'first_image.json'}, {out / 'first_image.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
