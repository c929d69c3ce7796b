"""Patch / CFG parallelism against one GPU, in one torchrun job (issue #9).

    torchrun --nproc-per-node 2 benchmarks/parallel_bench.py --out $OUT      # bash benchmarks/run_parallel.sh
    SMOKE=1 torchrun --nproc-per-node 2 benchmarks/parallel_bench.py --out /tmp/p   # tiny SDXL-like UNet, CPU, gloo

SDXL architecture (random weights, fp16) at each size: `1gpu` (stock pipeline on rank 0 while the
other ranks wait), `cfg` (CFG batch split over 2 GPUs), `patch-sync` (rows split, every step
synchronous), `patch-async` (DistriFusion: warm-up steps, then one-step-stale neighbours),
`patch-pcpp` (asynchronous, self-attention sees half of each neighbour's rows), and each of these
again with the UNet as CUDA graphs (`+graph`, `--graphs also`, the default on GPUs). Timed: the
denoising call with prompt encoding, output_type="latent" (no VAE decode), per-step times from
CUDA events in `callback_on_step_end`; per-CFG-step medians over the steps after warm-up.
Also: peak memory per GPU, bytes each rank sends per step (in steady state: asynchronous steps
where there are any), GPU time the compute stream waited on communication per step, the asynchronous step's collectives run back to back (unoverlapped), and
fidelity: PSNR of final latents (SDXL arch) and of decoded images (embedded model, trained).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import accel  # noqa: E402
from accel.parallel import PatchParallelConfig, get_patch_parallel, init_distributed  # noqa: E402

PROMPT = "a photo of a lighthouse on a cliff at sunset, highly detailed"


def log(rank: int, *parts) -> None:
    if rank == 0:
        print(*parts, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(smoke: bool, device: str):
    if smoke:
        sys.path.insert(0, str(REPO / "tests"))
        import tempfile

        from tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(Path(tempfile.mkdtemp())).to(device)
    else:
        from apps.bench_archs import build_pipeline

        pipe = build_pipeline("sdxl", device=device, dtype=torch.float16)
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepTimer:
    """callback_on_step_end that stamps the end of every step (CUDA events, or host time on CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.stamps = []

    def start(self):
        self.stamps = [self._stamp()]

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __call__(self, pipe, step, timestep, kwargs):
        self.stamps.append(self._stamp())
        return kwargs

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def denoise(pipe, size: int, steps: int, guidance: float, timer: StepTimer | None = None, seed: int = 0):
    kwargs = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                  output_type="latent", generator=torch.Generator("cpu").manual_seed(seed))
    if timer is not None:
        timer.start()
        kwargs["callback_on_step_end"] = timer
    return pipe(**kwargs).images


def latent_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    peak = float(b.max() - b.min())
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak * peak / mse)).item()


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_config(pipe, name: str, config, args, size: int, rank: int, device: str, graph: bool = False) -> dict:
    """Time one config at one size on every rank (config None: one GPU, rank 0 alone); with `graph`
    the UNet runs as CUDA graphs. Returns rank 0's record."""
    alone = config is None
    active = not alone or rank == 0
    record = {"config": name, "size": size, "cuda_graph": graph}
    latents = None
    dist.barrier()
    plan = None
    if active:
        runtime = accel.RuntimeConfig(cuda_graph=True) if graph else None
        applied = not alone or graph
        if applied:  # a layout error raises on every rank
            accel.accelerate(pipe, accel.AccelConfig(parallel=config, runtime=runtime))
        try:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            denoise(pipe, size, args.steps, args.guidance)  # warm-up (cuDNN / kernel selection, comm layout)
            timer, per_step, totals = StepTimer(device), [], []
            first_async = 0 if alone or config.sync or config.mode == "cfg" else config.warmup_steps
            for run in range(args.runs):
                sync(device)
                start = time.perf_counter()
                latents = denoise(pipe, size, args.steps, args.guidance, timer)
                sync(device)
                totals.append((time.perf_counter() - start) * 1e3)
                per_step += timer.step_ms()[max(1, first_async):]  # step 0 includes the first UNet layout
            record.update(step_ms=statistics.median(per_step), call_ms=statistics.median(totals),
                          steps=args.steps, measured_steps=len(per_step) // args.runs)
            plan = None if alone else get_patch_parallel(pipe)
            if plan is not None and plan.comm is not None:
                comm = plan.comm
                comm.reset_stats()
                comm.timing = True
                denoise(pipe, size, args.steps, args.guidance)
                comm.timing = False
                stats = comm.read_stats()
                # Steady state: the asynchronous steps where there are any, else the synchronous ones.
                kind = "async" if stats["async_calls"] else "sync"
                calls = max(1, stats[f"{kind}_calls"])
                record.update(
                    comm_kind=kind,
                    comm_mb_per_step=stats[f"bytes_sent_{kind}"] / calls / 2**20,
                    # A replayed graph's waits cannot be timed from the host.
                    comm_wait_ms_per_step=None if graph else stats[f"wait_ms_{kind}"] / calls,
                    sync_calls=stats["sync_calls"], async_calls=stats["async_calls"],
                    collectives_per_call=stats["collectives"] / max(1, stats["calls"]),
                    stats=stats,
                )
            if plan is not None:
                record["output_mb_per_step"] = plan.output_bytes / max(1, plan.calls) / 2**20
            if device.startswith("cuda"):
                record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        finally:
            if plan is not None and plan.comm is not None:
                record["async_step_unoverlapped_ms"] = plan.comm.time_collectives()
            if applied:
                accel.restore(pipe)
    dist.barrier()
    peaks = gather(record.get("peak_gib"))
    record["peak_gib_per_rank"] = peaks
    return record, latents


def embedded_fidelity(args, rank: int, device: str) -> dict:
    """Decoded images of the trained embedded model: patch-sync and patch-async against one process."""
    from accel.embedded import CIFAR10_CLASSES, eval_prompt, load_embedded_pipeline
    from accel.quality.metrics import psnr

    pipe = load_embedded_pipeline(device=device, dtype=torch.float32)
    prompts = [eval_prompt(c) for c in CIFAR10_CLASSES]

    def images():
        out = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(0)).images
        return out.float().cpu()

    reference = images()
    result = {}
    runs = [("patch-sync", PatchParallelConfig(sync=True)),
            ("patch-async", PatchParallelConfig(warmup_steps=4)),
            ("patch-pcpp", PatchParallelConfig(warmup_steps=4, partial_conditioning=0.5))]
    if device.startswith("cuda") and args.graphs != "no":
        runs += [(name + "+graph", config) for name, config in runs]
    for name, config in runs:
        runtime = accel.RuntimeConfig(cuda_graph=True) if name.endswith("+graph") else None
        accel.accelerate(pipe, accel.AccelConfig(parallel=config, runtime=runtime))
        try:
            images()  # the first call captures the graphs
            result[name] = psnr(images(), reference).mean().item()
        finally:
            accel.restore(pipe)
    return result


def markdown(report: dict) -> str:
    lines = [f"# Patch / CFG parallelism, SDXL architecture (random weights, fp16), {report['device']}", "",
             f"torch {report['torch']}, world size {report['world']}, {report['steps']} Euler steps, CFG "
             f"{report['guidance']}, async configs: {report['warmup_steps']} synchronous warm-up steps; "
             "per-CFG-step medians over the steps after warm-up; `call` = prompt encoding + denoising "
             "(no VAE decode).", "",
             "`+graph`: the UNet runs as CUDA graphs (`RuntimeConfig(cuda_graph=True)`); speed-up against 1 GPU "
             "eager, and against 1 GPU with the same runtime.", "",
             "| size | config | step ms | speed-up (vs 1 GPU eager) | vs 1 GPU same runtime | call ms | peak GiB per GPU | "
             "MiB sent/step (patches + output) | comm wait ms/step | "
             "async step comm, unoverlapped ms | latent PSNR to patch-sync |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['config']} | - | - | - | - | - | - | - | - | {r['error']} |")
            continue

        def f(key, fmt="{:.1f}"):
            value = r.get(key)
            return "-" if value is None else fmt.format(value)

        peaks = "/".join("-" if p is None else f"{p:.1f}" for p in r.get("peak_gib_per_rank", []))
        lines.append(f"| {r['size']} | {r['config']} | {f('step_ms', '{:.2f}')} | {f('speedup', '{:.2f}x')} | "
                     f"{f('speedup_same_runtime', '{:.2f}x')} | "
                     f"{f('call_ms')} | {peaks} | {f('comm_mb_per_step')} + {f('output_mb_per_step')} | "
                     f"{f('comm_wait_ms_per_step', '{:.2f}')} | "
                     f"{f('async_step_unoverlapped_ms', '{:.2f}')} | {f('psnr_to_sync', '{:.1f} dB')} |")
    emb = report.get("embedded")
    if emb:
        lines += ["", "Embedded model (trained, fp32, 20 DPM-Solver++ steps, guidance 4, 10 prompts), PSNR of decoded "
                  "images to one process: " + ", ".join(f"{k} {v:.1f} dB" for k, v in emb.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1")
    parser.add_argument("--sizes", default=None, help="comma-separated image sizes (default: 2048,1024; smoke 64,32)")
    parser.add_argument("--steps", type=int, default=None, help="default 10 (smoke 4)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--graphs", choices=("no", "also", "only"), default="also",
                        help="also time every config with the UNet as CUDA graphs (RuntimeConfig(cuda_graph=True)); "
                             "graphs need CUDA, so smoke runs skip them")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the config names")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    args.sizes = [int(s) for s in (args.sizes or ("64,32" if args.smoke else "2048,1024")).split(",")]
    args.steps = args.steps or (4 if args.smoke else 10)
    if args.smoke:
        args.warmup_steps = min(args.warmup_steps, 1)
        torch.set_num_threads(1)
    rank, world, device = init_distributed("cpu" if args.smoke else "auto")
    if world < 2:
        raise SystemExit("run under torchrun --nproc-per-node 2 (or more)")
    out = Path(args.out)
    start = time.perf_counter()
    pipe = build(args.smoke, device)
    log(rank, f"built the pipeline in {time.perf_counter() - start:.1f} s on {device}, world size {world}")

    configs = {
        "1gpu": None,
        "cfg": PatchParallelConfig(mode="cfg"),
        "patch-sync": PatchParallelConfig(sync=True),
        "patch-async": PatchParallelConfig(warmup_steps=args.warmup_steps),
        "patch-pcpp": PatchParallelConfig(warmup_steps=args.warmup_steps, partial_conditioning=0.5),
        "patch+cfg": PatchParallelConfig(mode="patch+cfg", warmup_steps=args.warmup_steps),
    }
    runs = []  # (name, config, CUDA graphs?)
    graph_modes = {"no": (False,), "also": (False, True), "only": (True,)}[args.graphs]
    if args.smoke or not device.startswith("cuda"):
        graph_modes = (False,)
    for graph in graph_modes:
        runs += [(name + ("+graph" if graph else ""), config, graph) for name, config in configs.items()]
    if args.configs:
        wanted = set(args.configs.split(","))
        runs = [r for r in runs if r[0] in wanted]
    results = []
    for size in args.sizes:
        latents, base_ms = {}, {}
        for name, config, graph in runs:
            t0 = time.perf_counter()
            try:
                record, final = run_config(pipe, name, config, args, size, rank, device, graph)
            except ValueError as err:  # a layout this world size cannot host (patch+cfg on 2 GPUs)
                results.append({"config": name, "size": size, "error": str(err).split(";")[0]})
                log(rank, f"{size}px {name}: {err}")
                continue
            if final is not None:
                latents[name] = final
            if config is None:
                base_ms[graph] = gather(record["step_ms"] if rank == 0 else None)[0]
            eager_ms, same_ms = base_ms.get(False), base_ms.get(graph)
            if record.get("step_ms"):
                # Against one GPU in eager mode, and against one GPU with the same runtime (graphs or not).
                record["speedup"] = eager_ms / record["step_ms"] if eager_ms else None
                record["speedup_same_runtime"] = same_ms / record["step_ms"] if same_ms else None
            results.append(record)
            log(rank, f"{size}px {name}: {record.get('step_ms', 0):.2f} ms/step ({record.get('speedup') or 0:.2f}x eager "
                      f"1 GPU, {record.get('speedup_same_runtime') or 0:.2f}x 1 GPU same runtime), "
                      f"peak {record['peak_gib_per_rank']} GiB, {time.perf_counter() - t0:.0f} s")
        reference = next((name for name in ("patch-sync", "patch-sync+graph") if name in latents), None)
        if rank == 0 and reference is not None:
            for record in results:
                if record.get("size") == size and record["config"] in latents:
                    record["psnr_to_sync"] = latent_psnr(latents[record["config"]], latents[reference])
                    record["psnr_reference"] = reference
        log(rank, f"done {size}px at {time.perf_counter() - start:.0f} s")
        if rank == 0:  # kept if a later size is cut short by the time limit
            out.mkdir(parents=True, exist_ok=True)
            (out / "parallel.partial.json").write_text(json.dumps({"results": results}, indent=1))

    embedded = embedded_fidelity(args, rank, device)
    log(rank, f"embedded model PSNR to one process: {embedded}")
    if rank == 0:
        report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu (smoke)",
                  "torch": torch.__version__, "world": world, "steps": args.steps, "guidance": args.guidance,
                  "warmup_steps": args.warmup_steps, "smoke": args.smoke, "results": results, "embedded": embedded,
                  "seconds": time.perf_counter() - start}
        out.mkdir(parents=True, exist_ok=True)
        (out / "parallel.json").write_text(json.dumps(report, indent=1))
        table = markdown(report)
        (out / "parallel.md").write_text(table)
        print(table, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
