"""Cold start with and without portable compile artifacts (issue 23): what `accel precompile` saves a new machine.

    source benchmarks/device_setup.sh && python3 benchmarks/runtime/cold_start.py --out $OUT/cold     # H200
    python benchmarks/runtime/cold_start.py --smoke --out /tmp/cold                                  # CPU

Each case runs in a fresh process with its own empty TORCHINDUCTOR_CACHE_DIR (a new machine): SD1.5
architecture (random weights), fp16, 512 px, `preset="balanced"` (DPM-Solver++ 2M 20 steps, SDPA, channels-last,
full torch.compile and CUDA graphs of denoiser, VAE decoder and text encoder), CFG 7.5, seed 0.

    cold        no artifacts: `accelerate()`, the first call (compile + capture), the second, the median of 5 more
    precompile  `apps.cli.precompile` (what `accel precompile` runs) writes the artifacts: its time, their size
    artifacts   the preset with `compile_cache=` that folder: the same timings, the artifact log line, dynamo's
                and inductor's counters (inductor compilations are FX graph cache misses)

The first image of `artifacts` is compared with `cold`'s (PSNR). `--smoke` runs the same cases on the CPU with
the embedded model at 32 px, the denoiser alone compiled, without CUDA graphs (about 3 min). The report (`cold_start.json`, `cold_start.md`) is rewritten
after every case, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_time import REPO, dynamo_compile_times, fresh_process  # noqa: E402

CASES = ("cold", "precompile", "artifacts")
PROMPT, GUIDANCE, STEADY_CALLS = "a photo of a cat", 7.5, 5
# Seconds a case's first call is guessed to take before `cold` measured one (SD1.5 balanced: 71 s on an H200).
FIRST_CALL_GUESS = {"sd15": 75.0, "sdxl": 150.0, "embedded": 60.0}
SETUP_GUESS = 30.0  # imports, building the pipeline, the calls after the first
ARTIFACTS_SHARE = 0.5  # of the cold first call, guessed for `artifacts` (dynamo still traces, graphs are captured)


def _pipeline(arch: str, smoke: bool, compile_components: str | None = None):
    import torch

    import accel
    from apps.bench_archs import DEFAULT_SIZE, build_pipeline

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    pipe = build_pipeline(arch, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    config = accel.resolve_config(preset="balanced", pipe=pipe)
    if compile_components:  # "all": every component the preset graphs; else a comma-separated list of them
        chosen = None if compile_components == "all" else tuple(compile_components.split(","))
        config = config.replace(runtime=replace(config.runtime, compile_components=chosen))
    if smoke:
        # A CPU-capable runtime: graphs need CUDA. The denoiser alone, since on a CPU every case compiles inductor's
        # C++ kernels from source (the mega-cache holds their source, not the built libraries: on a GPU it bundles
        # the Triton binaries), a minute per component; one thread, as a shared CPU's OpenMP spin-waits swamp timings.
        config = config.replace(runtime=replace(config.runtime, cuda_graph=False, components=("denoiser",),
                                                compile_components=None))
        torch.set_num_threads(1)
    return pipe, config, DEFAULT_SIZE[arch]


class _Lines(logging.Handler):
    """The suite's log lines of this process (the artifact load or its mismatch, graph fallbacks)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.name}: {record.getMessage()}")


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {group: dict(counters[group]) for group in ("stats", "inductor", "aot_autograd") if counters[group]}


def child(case: str, arch: str, smoke: bool, artifacts: str, out: Path, compile_components: str | None = None) -> dict:
    import numpy as np
    import torch

    import accel
    from accel.runtime import compile_cache_report

    lines = _Lines()
    logging.getLogger("accel").addHandler(lines)
    logging.getLogger("accel").setLevel(logging.INFO)
    pipe, config, size = _pipeline(arch, smoke, compile_components)
    call = {"prompt": PROMPT, "guidance_scale": GUIDANCE}
    record = {"case": case, "arch": arch, "size": size, "steps": config.sampler.num_steps, "torch": torch.__version__,
              "compiled": list(config.runtime.compiled_components), "graphed": list(config.runtime.components),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "cpu"}
    if case == "precompile":
        from apps.cli import precompile

        start = time.perf_counter()
        report = precompile(pipe, config, [(size, size)], artifacts, call)
        record.update(precompile_s=time.perf_counter() - start, first_call_s=report["seconds"][f"{size}x{size}"],
                      saved=report["saved"], loaded=report["loaded"],
                      artifact_bytes=sum(p.stat().st_size for p in Path(artifacts).glob("*.bin")))
    else:
        if case == "artifacts":
            config = config.replace(runtime=replace(config.runtime, compile_cache=artifacts))

        def generate():
            image = pipe(**call, height=size, width=size, generator=torch.Generator("cpu").manual_seed(0),
                         output_type="np").images
            if not smoke:
                torch.cuda.synchronize()
            return image

        start = time.perf_counter()
        accel.accelerate(pipe, config)
        record["accelerate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        image = generate()
        record["first_call_s"] = time.perf_counter() - start
        record["counters_after_first_call"] = _counters()
        start = time.perf_counter()
        generate()
        record["second_call_s"] = time.perf_counter() - start
        times = []
        for _ in range(STEADY_CALLS):
            start = time.perf_counter()
            generate()
            times.append(time.perf_counter() - start)
        record.update(median_s=statistics.median(times), times_s=times, compile_cache=compile_cache_report(pipe))
        np.save(out / f"{arch}-{case}.npy", image[0])  # for the PSNR of `artifacts` against `cold`
    record.update(counters=_counters(), compile_times=dynamo_compile_times(), log=lines.lines[-40:])
    return record


def _psnr(out: Path, arch: str) -> float | None:
    """PSNR (dB) of `artifacts`' first image against `cold`'s; None until both exist."""
    import numpy as np
    import torch

    from accel.quality.metrics import psnr

    paths = [out / f"{arch}-{case}.npy" for case in ("cold", "artifacts")]
    if not all(p.is_file() for p in paths):
        return None
    a, b = (torch.from_numpy(np.load(p)).permute(2, 0, 1) for p in paths)
    return float(psnr(a, b))


def _estimate(case: str, arch: str, records: list[dict]) -> float:
    """Seconds `case` is guessed to need, from the `cold` case of `arch` where it ran."""
    cold = next((r for r in records if r["arch"] == arch and r["case"] == "cold" and "first_call_s" in r), None)
    first = cold["first_call_s"] if cold else FIRST_CALL_GUESS[arch]
    setup = cold["wall_s"] - first if cold else SETUP_GUESS
    return setup + first * (ARTIFACTS_SHARE if case == "artifacts" else 1.0)


def _loaded(record: dict) -> bool | None:
    report = record.get("compile_cache")
    return None if report is None else bool(report["loaded"])


def write_report(out: Path, records: list[dict], meta: dict) -> None:
    (out / "cold_start.json").write_text(json.dumps({**meta, "records": records}, indent=1))
    rows = ["| arch | case | compiled | accelerate() s | first call s | second call s | steady median ms | precompile s | "
            "artifacts MB | artifacts loaded | inductor compilations (FX cache misses) | FX cache hits | "
            "dynamo graphs | wall s |", "| --- " * 14 + "|"]

    def cell(value, scale=1.0, digits=1):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    for r in records:
        if "error" in r:
            reason = (r["error"].strip().splitlines() or ["failed without a message"])[-1][:160]
            rows.append(f"| {r['arch']} | {r['case']} | - | {reason} |" + " |" * 11)
            continue
        inductor, stats = r["counters"].get("inductor", {}), r["counters"].get("stats", {})
        loaded = _loaded(r)
        rows.append(" | ".join([
            f"| {r['arch']}", r["case"], "+".join(r.get("compiled", [])) or "-", cell(r.get("accelerate_s"), digits=2),
            cell(r.get("first_call_s")),
            cell(r.get("second_call_s"), digits=2), cell(r.get("median_s"), 1e3), cell(r.get("precompile_s")),
            cell(r.get("artifact_bytes"), 1e-6), "-" if loaded is None else ("yes" if loaded else "no"),
            str(inductor.get("fxgraph_cache_miss", 0)), str(inductor.get("fxgraph_cache_hit", 0)),
            str(stats.get("unique_graphs", 0)), cell(r.get("wall_s")) + " |"]))
    device = next((f"{r['device']}, torch {r['torch']}" for r in records if "device" in r), "-")
    text = [f"# Cold start with and without compile artifacts ({meta['mode']})", "",
            f"`{meta['command']}`", "", f"{device}, diffusers {meta['diffusers']}; each case a fresh process on an "
            "empty inductor cache; `balanced` preset, CFG 7.5, seed 0.", "", *rows, ""]
    for arch in dict.fromkeys(r["arch"] for r in records):
        value = _psnr(out, arch)
        if value is not None:
            text.append(f"- {arch}: PSNR of `artifacts`' first image against `cold`'s: {value:.2f} dB "
                        "(inf: identical)")
        for r in records:
            hits = [l for l in r.get("log", ()) if "compile artifacts" in l or "no matching artifacts" in l]
            if r["arch"] == arch and hits:
                text.append(f"- {arch} {r['case']}: `{hits[0]}`")
    (out / "cold_start.md").write_text("\n".join(text) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15", help="sd15, sdxl or both comma-separated (default: sd15)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--budget", type=float, default=300, help="seconds for all cases; a case guessed not to fit "
                        "in what is left is skipped")
    parser.add_argument("--artifacts", default=None, help="folder the precompile case writes (default: a new "
                        "temporary folder, kept out of --out)")
    parser.add_argument("--smoke", action="store_true", help="the embedded model on the CPU at 32 px, no CUDA graphs")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, in this order (default: all); "
                        "without cold, the artifacts' image has no PSNR against a cold one")
    parser.add_argument("--compile-components", default=None, help="the components compiled, comma-separated from "
                        "the preset's (denoiser, vae, text_encoder), or 'all' (default: the preset's choice)")
    parser.add_argument("--child", default=None, choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archs = ["embedded"] if args.smoke else args.arch.split(",")
    if args.child:
        sys.path.insert(0, str(REPO))
        print("RECORD " + json.dumps(child(args.child, archs[0], args.smoke, args.artifacts, out,
                                           args.compile_components)), flush=True)
        return 0
    import diffusers
    import torch

    artifacts = Path(args.artifacts or tempfile.mkdtemp(prefix="accel-artifacts-"))
    meta = {"command": shlex.join(["python3", *sys.argv]), "mode": "smoke, CPU" if args.smoke else "GPU",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "budget_s": args.budget}
    start, records = time.perf_counter(), []
    for arch in archs:
        for case in [c for c in CASES if c in args.cases.split(",")]:
            left = args.budget - (time.perf_counter() - start)
            guess = _estimate(case, arch, records)
            if left < guess:
                record = {"error": f"skipped: {left:.0f} s left of the budget, about {guess:.0f} s needed"}
            else:
                began = time.perf_counter()
                child_args = ["--child", case, "--arch", arch, "--out", str(out), "--artifacts", str(artifacts / arch)]
                if args.compile_components:
                    child_args += ["--compile-components", args.compile_components]
                record = fresh_process(__file__, child_args + (["--smoke"] if args.smoke else []),
                                       tempfile.mkdtemp(prefix=f"inductor-{case}-"), left)
                record["wall_s"] = time.perf_counter() - began
            records.append({"arch": arch, "case": case, **record})
            write_report(out, records, meta)
            r = records[-1]
            print(f"{arch} {case}: " + (r["error"][-300:] if "error" in r else
                  f"first call {r['first_call_s']:.1f} s, wall {r['wall_s']:.1f} s, loaded {_loaded(r)}, inductor "
                  f"{r['counters'].get('inductor', {})}"), flush=True)
    print(f"wrote {out / 'cold_start.json'}, {out / 'cold_start.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
