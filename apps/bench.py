"""Benchmark harness: stock diffusers, peer packages and our configs in one process, one GPU.

For each configuration: median end-to-end latency over >= 5 device-synchronised runs after
warm-up, steps/s, peak memory, first-call time (compilation, graph capture), and fidelity (PSNR,
SSIM) to the stock output with the same seed. Optionally the UNet step alone at CFG batch 2.
Writes JSON, a markdown table and a speed-vs-quality plot.

    accel bench --arch sd15 --configs stock,graph,compile+graph --steps 20 --out benchmarks/results/sd15
"""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import accel
from accel import AccelConfig, RuntimeConfig, SamplerConfig
from accel.cache import DeepCacheConfig

ALL_COMPONENTS = ("denoiser", "vae", "text_encoder")
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


class PeerConfig:
    """A peer package's acceleration, applied through its own API: `enable(pipe)` returns `undo()`."""

    def __init__(self, description: str, enable):
        self.description = description
        self.enable = enable
        self.sampler = None

    def __repr__(self) -> str:
        return f"PeerConfig({self.description!r})"


def _deepcache_package(pipe):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    return helper.disable


def bench_configs() -> dict[str, AccelConfig | PeerConfig | None]:
    """Named configurations; `stock` is the unaccelerated pipeline, presets are included by name,
    peer packages (`*-pkg`) where they are installed."""
    graph_compiled = RuntimeConfig(compile="regional", cuda_graph=True)
    compiled = accel.get_preset("balanced").runtime  # channels-last, full compile, graphs of every component
    configs: dict[str, AccelConfig | PeerConfig | None] = {
        "stock": None,
        "sdpa-flash": AccelConfig(runtime=RuntimeConfig(attention="flash")),
        "graph": AccelConfig(runtime=RuntimeConfig(cuda_graph=True)),
        "compile": AccelConfig(runtime=RuntimeConfig(compile="regional")),
        "compile+graph": AccelConfig(runtime=RuntimeConfig(compile="regional", cuda_graph=True)),
        "full-compile+graph": AccelConfig(runtime=RuntimeConfig(compile="full", cuda_graph=True)),
        "graph-all": AccelConfig(runtime=RuntimeConfig(cuda_graph=True, components=ALL_COMPONENTS)),
        "full-compile+graph-all": AccelConfig(
            runtime=RuntimeConfig(compile="full", cuda_graph=True, components=ALL_COMPONENTS)
        ),
        "fused+full-compile+graph-all": AccelConfig(
            runtime=RuntimeConfig(fuse_qkv=True, compile="full", cuda_graph=True, components=ALL_COMPONENTS)
        ),
        "channels-last+full-compile+graph-all": AccelConfig(
            runtime=RuntimeConfig(compile="full", cuda_graph=True, channels_last=True, components=ALL_COMPONENTS)
        ),
        "deepcache": AccelConfig(cache=DeepCacheConfig(cache_interval=3, cache_branch=0)),
        "deepcache-i4": AccelConfig(cache=DeepCacheConfig(cache_interval=4, cache_branch=0)),
        "deepcache-i5": AccelConfig(cache=DeepCacheConfig(cache_interval=5, cache_branch=0)),
        "deepcache-nonuniform": AccelConfig(cache=DeepCacheConfig(cache_interval=3, cache_branch=0, uniform=False)),
        "deepcache+graph": AccelConfig(cache=DeepCacheConfig(cache_interval=3), runtime=RuntimeConfig(cuda_graph=True)),
        "deepcache+compile+graph": AccelConfig(cache=DeepCacheConfig(cache_interval=3), runtime=graph_compiled),
        "compiled": AccelConfig(runtime=compiled),
        "deepcache+compiled": AccelConfig(cache=DeepCacheConfig(cache_interval=3), runtime=compiled),
        "deepcache+full-compile+graph-all": AccelConfig(
            cache=DeepCacheConfig(cache_interval=3),
            runtime=RuntimeConfig(compile="full", cuda_graph=True, components=ALL_COMPONENTS),
        ),
    }
    if importlib.util.find_spec("DeepCache") is not None:
        configs["deepcache-pkg"] = PeerConfig("DeepCache package, DeepCacheSDHelper interval 3, branch 0", _deepcache_package)
    for name in accel.preset_names():
        configs[name] = accel.get_preset(name)
    return configs


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _images_to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])).permute(0, 3, 1, 2)


def _call(pipe, args, seed: int):
    device = pipe.device.type
    generator = torch.Generator(device).manual_seed(seed)
    return pipe(generator=generator, **args).images


def time_pipeline(pipe, args: dict, *, runs: int, warmup: int, seed: int) -> dict:
    _sync()
    start = time.perf_counter()
    images = _call(pipe, args, seed)
    _sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        _call(pipe, args, seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        _sync()
        start = time.perf_counter()
        images = _call(pipe, args, seed)
        _sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"first_call_s": first, "times_s": times, "median_s": statistics.median(times), "peak_mem_gib": peak,
            "images": images}


def time_unet_step(pipe, *, height: int, width: int, iters: int = 30) -> float:
    """Median milliseconds of one UNet call at CFG batch 2, timed with CUDA events."""
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, height // scale, width // scale, device=pipe.device, dtype=unet.dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=pipe.device, dtype=unet.dtype)
    kwargs = {"encoder_hidden_states": context, "return_dict": False}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim,
                                       device=pipe.device, dtype=unet.dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, device=pipe.device, dtype=unet.dtype),
        }
    timestep = torch.tensor(500, device=pipe.device)
    with torch.no_grad():
        for _ in range(3):
            unet(sample, timestep, **kwargs)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            unet(sample, timestep, **kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_benchmark(arch: str, config_names: list[str], *, steps: int, scheduler: str, size: int | None = None,
                  guidance: float = 7.5, runs: int = 5, warmup: int = 2, seed: int = 0, unet_step: bool = False,
                  prompt: str = "a photo of an astronaut riding a horse on mars", interleave: bool = False) -> dict:
    from diffusers import schedulers as diffusers_schedulers

    from apps.bench_archs import DEFAULT_SIZE, build_pipeline
    from accel.quality.metrics import psnr, ssim

    configs = bench_configs()
    unknown = [n for n in config_names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown bench config(s) {unknown}; valid: {', '.join(configs)}")
    if scheduler not in SCHEDULERS:
        raise SystemExit(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    size = size or DEFAULT_SIZE[arch]
    pipe = build_pipeline(arch)
    pipe.set_progress_bar_config(disable=True)
    scheduler_cls = getattr(diffusers_schedulers, SCHEDULERS[scheduler])
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    args = {"prompt": prompt, "num_inference_steps": steps, "guidance_scale": guidance, "height": size, "width": size}

    def call_args(name):  # a config with a sampler brings its own step count
        config = configs[name]
        sampler = None if config is None or isinstance(config, PeerConfig) else config.sampler
        return args if sampler is None else {k: v for k, v in args.items() if k != "num_inference_steps"}

    def measure(name: str, runs: int, warmup: int) -> dict:
        undo = _apply(pipe, configs[name])
        try:
            timing = time_pipeline(pipe, call_args(name), runs=runs, warmup=warmup, seed=seed)
            if unet_step:
                timing["unet_step_ms"] = time_unet_step(pipe, height=size, width=size)
        finally:
            undo()
        return timing

    timings: dict[str, dict] = {}
    if interleave:
        compiled = [n for n in config_names if getattr(getattr(configs[n], "runtime", None), "compile", None)]
        if compiled:
            raise SystemExit(f"--interleave applies each config once per round; compiled configs would recompile: {compiled}")
        # Round-robin, one timed call per config and round: a host whose speed drifts slows every config alike. The
        # order reverses every other round (ABBA), so that a drift within a round favours no config's position.
        for round_index in range(runs):
            for name in (config_names if round_index % 2 == 0 else config_names[::-1]):
                timing = measure(name, 1, warmup if round_index == 0 else 1)
                merged = timings.setdefault(name, {**timing, "times_s": []})
                merged["times_s"] += timing["times_s"]
                merged["images"], merged["peak_mem_gib"] = timing["images"], max(
                    merged["peak_mem_gib"] or 0, timing["peak_mem_gib"] or 0) or None
            print(f"[bench] round {round_index + 1}/{runs}: " + ", ".join(
                f"{n} {timings[n]['times_s'][-1] * 1000:.1f} ms" for n in config_names), flush=True)
        for timing in timings.values():
            timing["median_s"] = statistics.median(timing["times_s"])
    else:
        for name in config_names:
            print(f"[bench] {arch} {size}px {steps} steps: {name} ...", flush=True)
            # Each config compiles from scratch (the on-disk inductor cache stays warm), so first-call
            # times are comparable and no config reuses code specialised for another's layout.
            torch._dynamo.reset()
            timings[name] = measure(name, runs, warmup)
            print(f"[bench]   median {timings[name]['median_s']*1000:.1f} ms, first call "
                  f"{timings[name]['first_call_s']:.1f} s" + (f", unet step {timings[name]['unet_step_ms']:.2f} ms"
                                                                if unet_step else ""), flush=True)

    results, reference = [], None
    for name in config_names:
        timing = timings[name]
        row = {"config": name, "accel_config": repr(configs[name])}
        row.update({k: v for k, v in timing.items() if k != "images"})
        config = configs[name]
        sampler = None if config is None or isinstance(config, PeerConfig) else config.sampler
        row["steps"] = steps if sampler is None else sampler.num_steps
        row["steps_per_s"] = row["steps"] / timing["median_s"]
        images = _images_to_tensor(timing["images"])
        if reference is None and name == "stock":
            reference = images
        if reference is not None:
            row["psnr_db"] = float(psnr(images, reference).mean())
            row["ssim"] = float(ssim(images, reference).mean())
        results.append(row)
    stock = timings.get("stock")
    for row in results:
        if stock is None:
            continue
        if interleave:  # the median of each round's ratio to that round's stock call
            row["speedup"] = statistics.median(s / t for s, t in zip(stock["times_s"], row["times_s"]))
        else:
            row["speedup"] = stock["median_s"] / row["median_s"]
    if interleave:  # every pair of configs, round by round: the comparison the drift blurs least
        for row in results:
            row["paired"] = {
                other["config"]: {"speedup": statistics.median(o / t for o, t in zip(other["times_s"], row["times_s"])),
                                  "rounds_faster": sum(t < o for o, t in zip(other["times_s"], row["times_s"]))}
                for other in results if other is not row}
    meta = _meta(arch, size, steps, scheduler, guidance, runs, warmup)
    meta["interleaved"] = interleave
    return {"meta": meta, "results": results}


def _apply(pipe, config):
    """Apply one bench config; return what undoes it."""
    if config is None:
        return lambda: None
    if isinstance(config, PeerConfig):
        return config.enable(pipe)
    accel.accelerate(pipe, config)
    return lambda: accel.restore(pipe)


def _meta(arch, size, steps, scheduler, guidance, runs, warmup) -> dict:
    import diffusers

    return {
        "arch": arch, "size": size, "steps": steps, "scheduler": scheduler, "guidance": guidance, "runs": runs,
        "warmup": warmup, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "command": "accel " + " ".join(sys.argv[1:]),
        "dtype": "float16", "date": time.strftime("%Y-%m-%d"),
    }


def markdown_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"{meta['arch']} {meta['size']}px, {meta['scheduler']} {meta['steps']} steps, CFG {meta['guidance']}, "
        f"{meta['dtype']}, {meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}; "
        f"median of {meta['runs']} runs after {meta['warmup']} warm-up"
        + ("; configs interleaved round by round (order reversed every other round), speed-up = median of "
           "each round's ratio to stock"
           if meta.get("interleaved") else ""),
        "",
        "| config | steps | median (ms) | speed-up | steps/s | UNet step (ms) | first call (s) | peak GiB | PSNR (dB) | SSIM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        lines.append(f"| {r['config']} | {r['steps']} | {r['median_s']*1000:.1f} | {f('speedup', '.2f')}x | "
                     f"{f('steps_per_s', '.1f')} | {f('unet_step_ms', '.2f')} | {f('first_call_s', '.1f')} | "
                     f"{f('peak_mem_gib', '.2f')} | {f('psnr_db', '.1f')} | {f('ssim', '.4f')} |")
    pairs = [(r, other, p) for r in report["results"] for other, p in r.get("paired", {}).items()
             if "stock" not in (r["config"], other) and r["config"] < other]
    if pairs:
        lines += [""] + [f"Paired per round: {r['config']} {p['speedup']:.3f}x over {other}, faster in "
                         f"{p['rounds_faster']} of {len(r['times_s'])} rounds" for r, other, p in pairs]
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    """Speed-up against PSNR to stock, one point per config (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["results"]:
        y = min(r.get("psnr_db", 0.0), 60.0)  # identical outputs (inf dB) drawn at the top
        ax.scatter(r.get("speedup", 1.0), y)
        ax.annotate(r["config"], (r.get("speedup", 1.0), y), fontsize=7)
    ax.set_xlabel("speed-up over stock diffusers")
    ax.set_ylabel("PSNR to stock output (dB, capped at 60)")
    ax.set_title(f"{report['meta']['arch']} {report['meta']['size']}px on {report['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")
    clean = json.loads(json.dumps(report, default=str).replace("Infinity", "null"))
    json_path.write_text(json.dumps(clean, indent=2))
    md_path.write_text(markdown_table(report))
    written = [json_path, md_path]
    if plot(report, png_path):
        written.append(png_path)
    return written


def main(args) -> int:
    """`accel bench`: the parser lives in apps.cli so that other commands start without torch."""
    if not torch.cuda.is_available():  # its pipelines are fp16 on CUDA and its timings CUDA events
        raise SystemExit("error: accel bench measures on a CUDA GPU and none is available here; on a CPU, time "
                         "`accel generate` with and without --preset instead")
    if args.runs < 5:
        print("[bench] note: fewer than 5 timed runs", file=sys.stderr)
    report = run_benchmark(args.arch, args.configs.split(","), steps=args.steps, scheduler=args.scheduler,
                           size=args.size, guidance=args.guidance, runs=args.runs, warmup=args.warmup,
                           unet_step=args.unet_step, interleave=args.interleave)
    paths = write_report(report, args.out)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
