"""First-call time of regional compilation with a cold inductor cache, per variant (issue #5).

    python benchmarks/runtime/compile_time.py --out $OUT                   # on the GPU
    python benchmarks/runtime/compile_time.py --smoke --out /tmp/ct        # tiny SD pipeline, CPU

Each variant runs in a fresh process with an empty TORCHINDUCTOR_CACHE_DIR (a cold start; a "-warm" variant
reuses the cache its cold variant left): SD1.5
architecture, fp16, 512 px, DPM-Solver++ 20 steps, CFG, `RuntimeConfig(compile="regional",
cuda_graph=True)`. Recorded: the first call (compile + graph capture), dynamo's graph count and its
own compile-time breakdown, and the steady-state median of 5 calls, so a faster compile is never
bought with a slower step unnoticed. Variants change which block classes are compiled and whether
dynamo may turn a recompiled shape dynamic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_BEFORE = ("BasicTransformerBlock", "Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "Attention",
           "CLIPEncoderLayer")  # the regional set before 2026-11-23
VARIANTS = {
    # name: (regional block classes or None for the current default, compile kwargs)
    "default": (None, {}),  # distinct blocks compiled in parallel worker processes first (precompile.py)
    "serial": (None, {"workers": 0}),  # the same blocks, compiled one after another in the calling process
    "workers-4": (None, {"workers": 4}),
    "workers-16": (None, {"workers": 16}),
    "default-warm": (None, {}),  # 'default' again in a new process on the cache 'default' left (run it after it)
    "before": (_BEFORE, {"dynamic": None}),  # what 'default' was: more block classes, automatic dynamic shapes
    "before-static": (_BEFORE, {"dynamic": False}),
    "dynamic": (None, {"dynamic": None}),
    "resnets": (("ResnetBlock2D", "CLIPEncoderLayer"), {}),
    "transformers": (("BasicTransformerBlock", "Transformer2DModel", "CLIPEncoderLayer"), {}),
    "all-dynamic": (None, {"dynamic": True}),  # every dim symbolic from the start: fewest graphs
    "graph-only": ((), {}),  # no compilation at all: CUDA graphs of the eager UNet, the floor to compare with
}
# The `balanced` preset's runtime (channels-last, UNet and VAE decoder compiled, CUDA graphs of those and the text
# encoder) with its compile swapped (issue 23: the fastest-compiling setup within 5% of the fastest steady state):
# name: (regional block classes or None for the default set, compile mode[, RuntimeConfig fields to replace]).
_STAGES = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D",
           "UNetMidBlock2D", "UpDecoderBlock2D")  # each resolution stage of the UNet and of the VAE decoder, whole
# One launch configuration per pointwise kernel instead of several benchmarked at the first run (the cold SD1.5
# compile ran 411 kernel benchmarks), and none of the pattern rewrites (4.2 of its 57.9 s in dynamo's breakdown;
# the preset's attention calls SDPA itself). Both together are the presets' `compile_options` since 2026-12-03.
_FEWER_CONFIGS = {"triton.autotune_pointwise": False}
_NO_PATTERNS = {"pattern_matcher": False}
PRESET_VARIANTS = {
    "balanced": (None, "full"),  # the preset as it is: the whole forward of each
    "balanced-regional": (None, "regional"),  # transformer and resnet blocks, distinct ones in worker processes
    "balanced-stages": (_STAGES, "regional"),  # the 9 UNet stages and 5 decoder stages, in worker processes
    # inductor as torch sets it: what `balanced` was before its compile_options (the sixth session's `balanced` row)
    "balanced-stock-inductor": (None, "full", {"compile_options": None}),
    "balanced-unet": (None, "full", {"compile_options": None, "compile_components": ("denoiser",)}),  # decoder eager
    "balanced-lean": (None, "full", {"compile_options": _FEWER_CONFIGS}),
    "balanced-lean-unet": (None, "full", {"compile_options": _FEWER_CONFIGS, "compile_components": ("denoiser",)}),
    "balanced-lean-nopatterns": (None, "full", {"compile_options": {**_FEWER_CONFIGS, **_NO_PATTERNS}}),
}


def child(name: str, smoke: bool) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    import accel
    from accel.runtime import compile as compile_mod

    preset_mode, preset_changes = None, {}
    if name in PRESET_VARIANTS:
        blocks, preset_mode, *rest = PRESET_VARIANTS[name]
        kwargs, preset_changes = {}, dict(rest[0]) if rest else {}
    else:
        blocks, kwargs = VARIANTS[name]
    if blocks is not None:
        compile_mod.REGIONAL_BLOCKS = blocks
    if kwargs:
        original = compile_mod.apply_compile
        compile_mod_kwargs = dict(kwargs)

        def apply_compile(module, mode, **extra):
            return original(module, mode, **{**extra, **compile_mod_kwargs})  # the variant's settings win

        import accel.runtime as runtime_pkg
        runtime_pkg.apply_compile = apply_compile
    device = "cpu" if smoke else "cuda"
    if smoke:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(Path(tempfile.mkdtemp()))
        size, steps, runtime = 32, 2, accel.RuntimeConfig(compile="regional")
    else:
        from apps.bench_archs import build_pipeline

        pipe = build_pipeline("sd15", device=device, dtype=torch.float16)
        size, steps, runtime = 512, 20, accel.RuntimeConfig(compile="regional", cuda_graph=True)
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if blocks == ():
        from dataclasses import replace

        runtime = replace(runtime, compile=None)
    if preset_mode is not None:
        from dataclasses import replace

        runtime = replace(accel.get_preset("balanced").runtime, compile=preset_mode, **preset_changes)
    applied = time.perf_counter()
    accel.accelerate(pipe, accel.AccelConfig(runtime=runtime))  # compile workers start here (precompile.py)

    def call():
        pipe("a photo of a cat", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        if device == "cuda":
            torch.cuda.synchronize()

    from torch._dynamo.utils import counters

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    from_accelerate = time.perf_counter() - applied  # the honest cold cost when the first call follows at once
    graphs_after_first = counters["stats"].get("unique_graphs", 0)
    times = []
    for _ in range(1 if smoke else 5):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    stats = {k: v for k, v in counters["stats"].items()}
    stats["unique_graphs_after_first_call"] = graphs_after_first  # more later: recompiles in steady state
    from accel.runtime import precompile_report

    record = {"variant": name, "first_call_s": first, "accelerate_to_first_call_end_s": from_accelerate,
              "median_s": statistics.median(times), "dynamo_stats": stats,
              "precompile": precompile_report(pipe.unet), "inductor": dict(counters["inductor"]),
              "regions": list(compile_mod.REGIONAL_BLOCKS if blocks is None else blocks), "compile_kwargs": kwargs,
              "runtime": repr(runtime),
              "compiled_modules": sorted(type(m).__name__ for c in (pipe.unet, pipe.vae.decoder) for m in c.modules()
                                         if m._compiled_call_impl is not None)}
    logs = (record["precompile"] or {}).get("logs")
    if logs:  # each worker's timeline, and why a graph it compiled was not the caller's
        record["worker_logs"] = {p.name: p.read_text()[-3000:] for p in sorted(Path(logs).glob("worker-*.log"))}
    record["compile_times"] = dynamo_compile_times()
    return record


def dynamo_compile_times() -> str:
    """dynamo's own breakdown of this process's compile time, as text."""
    from accel.runtime.precompile import compile_time_breakdown

    return compile_time_breakdown(4000)


def fresh_process(script: str, child_args: list[str], inductor_cache: str, timeout: float) -> dict:
    """Run `python script --child ...` in a new process on the inductor cache folder `inductor_cache` (Triton's
    cache inside it, as inductor places it by default) and return the dict it printed on its `RECORD ` line,
    else {"error": ...}."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_cache)
    env.pop("TRITON_CACHE_DIR", None)
    try:
        done = subprocess.run([sys.executable, script, *child_args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((l for l in done.stdout.splitlines() if l.startswith("RECORD ")), None)
    return json.loads(line[7:]) if line else {"error": done.stderr[-2000:]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join([*VARIANTS, *PRESET_VARIANTS])}")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=540, help="seconds for all variants; later ones are skipped")
    args = parser.parse_args()
    if args.child:
        print("RECORD " + json.dumps(child(args.child, args.smoke)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, records, caches = time.perf_counter(), [], {}
    for name in args.variants.split(","):
        left = args.budget - (time.perf_counter() - start)
        if left < 60 and not args.smoke:
            records.append({"variant": name, "error": "skipped: time budget spent"})
            continue
        cache = caches.get(name.removesuffix("-warm")) if name.endswith("-warm") else None
        caches[name] = cache or tempfile.mkdtemp(prefix=f"inductor-{name}-")
        child_args = ["--child", name, "--out", str(out)] + (["--smoke"] if args.smoke else [])
        record = {"variant": name, **fresh_process(__file__, child_args, caches[name], left)}
        records.append(record)
        print(f"{name}: first call {record.get('first_call_s', float('nan')):.1f} s (from accelerate "
              f"{record.get('accelerate_to_first_call_end_s', float('nan')):.1f} s), median "
              f"{1e3 * record.get('median_s', float('nan')):.1f} ms, graphs "
              f"{record.get('dynamo_stats', {}).get('unique_graphs')} {record.get('error', '')[:300]}", flush=True)
        (out / "compile_time.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
