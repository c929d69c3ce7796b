"""The compiled runtime, FP8 and fixed block-cache schedules on a Flux-dev-architecture transformer (issues 21, 22).

Flux.1-dev's published transformer and scheduler configs with random weights, built as `dit_cache.py` builds them
(bf16, 1024 px, 28 steps, guidance 3.5; prompt embeddings passed in, latents out). Contenders, in one process, each
enabled (`accel.accelerate`), warmed up by one call (compilation and CUDA-graph capture happen there), timed
(median of --runs synchronised calls) and restored (`accel.restore`) in turn, with `torch._dynamo.reset()` between
them (the on-disk inductor cache stays warm, so later contenders compile faster than the first):

- stock: eager bf16, diffusers' own attention (SDPA);
- runtime: SDPA at torch's own kernel choice, fused QKV, regional compilation (one compile per block kind: the
  dual- and single-stream blocks), CUDA graphs of the transformer's calls;
- runtime <pinned>: the same with SDPA pinned to one kernel (--pinned-attention, cuDNN on the GPU: torch's default
  order puts it last, FlashAttention-2 first); the contenders below take the faster of the two (or --attention);
- runtime fp8: the runtime with FP8 (E4M3, row-wise scales, `torch._scaled_mm`) linears (`RuntimeConfig.quantize`);
- runtime fp8 cache3: FP8 and the block cache on a fixed schedule, a full step every 3 steps after dit_cache.py's
  warm-up, first block only, the kept residual re-added (the fastest config);
- runtime cache3 / cache2 / cache3 taylor1: the runtime with that cache every 3 / 2 steps, the last with
  TaylorSeer's first-order forecast instead of the kept residual;
- runtime full (only when named in --configs): whole-forward compilation instead of regional;
- stock again, last: its latents must equal the first stock run's, or a restore left something behind.
In that order, the issues' targets first: a contender whose rough cost would pass --budget-s is skipped, with the
reason. The table ends with the issues' targets (issue 21: the runtime alone >= 1.5x at PSNR >= 40 dB to stock, the
best config >= 4x; issue 22: FP8 >= 1.6x over the bf16 runtime), met or not.

Per contender: ms per step (median call / steps) and per call, speed-up over stock, the warm-up call and the first
(compiling) transformer call in seconds, CUDA graphs captured, full / cached calls, layers quantized, peak memory,
PSNR of the final latents (float32, peak = stock's range) against stock's and, for FP8 and the cached contenders,
against the same config at 16 bit / without the cache. Written after every contender (flux_runtime.json, .md).

    python3 benchmarks/flux_runtime.py --out DIR [--runs N] [--budget-s S] [--configs a,b] [--smoke]

--smoke: a tiny Flux on the CPU in float32, 12 steps, one timed call each, FP8 through ACCEL_QUANTIZE_CPU=1,
inductor's CPU compile; the CUDA-graph hook runs there too and falls back to eager (graphs are GPU-only), and the
pinned kernel is SDPA's math one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from dit_cache import SCHEDULES, _call, build, full_steps

import accel
from accel import AccelConfig, RuntimeConfig
from accel.cache import BlockCacheConfig, get_block_cache
from accel.runtime import first_call_seconds, get_cuda_graph_hook, quantize_report
from accel.runtime.quantize import CPU_SWITCH


@dataclass(frozen=True)
class Contender:
    name: str
    config: AccelConfig | None  # None: stock
    reference: str | None = None  # another contender whose latents this one's are compared with too
    schedule: list[int] | None = None  # the full steps of a fixed cache schedule
    cost_s: float = 30  # a rough device-time estimate (build excluded) for the --budget-s guard


# Fused QKV, regional compilation, CUDA graphs: the runtime every contender but stock builds on.
RUNTIME = RuntimeConfig(attention="sdpa", fuse_qkv=True, compile="regional", cuda_graph=True)


def cache_config(interval: int, taylor_order: int | None = None) -> BlockCacheConfig:
    """A full step every `interval` steps after dit_cache.py's warm-up, first block only (F1B0)."""
    return BlockCacheConfig(threshold=None, cache_interval=interval, warmup_steps=SCHEDULES[interval], first_blocks=1,
                            taylor_order=taylor_order)


def first_contenders(pinned: str) -> list[Contender]:
    return [Contender("stock", None, cost_s=20),
            Contender("runtime", AccelConfig(runtime=RUNTIME), cost_s=100),
            Contender(f"runtime {pinned}", AccelConfig(runtime=replace(RUNTIME, attention=pinned)), "runtime", cost_s=60)]


def later_contenders(runtime: RuntimeConfig, steps: int, base: str = "runtime") -> list[Contender]:
    """The contenders built on `runtime`, the first contender `base` with the attention chosen, the issues' targets
    first (what --budget-s cuts is the tail)."""
    fp8 = replace(runtime, quantize="fp8")

    def cached(name: str, interval: int, order: int | None, config: RuntimeConfig, reference: str, cost_s: float):
        return Contender(name, AccelConfig(cache=cache_config(interval, order), runtime=config), reference,
                         full_steps(steps, interval, SCHEDULES[interval]), cost_s)

    return [Contender("runtime fp8", AccelConfig(runtime=fp8), base, cost_s=80),
            cached("runtime fp8 cache3", 3, None, fp8, "runtime cache3", 55),
            cached("runtime cache3", 3, None, runtime, base, 45),
            cached("runtime cache2", 2, None, runtime, base, 45),
            cached("runtime cache3 taylor1", 3, 1, runtime, "runtime cache3", 45),
            Contender("runtime full", AccelConfig(runtime=replace(runtime, compile="full")), base, cost_s=200)]


OPT_IN = ("runtime full",)  # run only when --configs names them: a full compile of Flux-dev takes about 2 minutes
STOCK_AGAIN = Contender("stock again", None, "stock", cost_s=20)


def latent_psnr(a: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of `a` against `reference`, the peak being the reference's range (latents are not in [0, 1])."""
    a, reference = a.float().cpu(), reference.float().cpu()
    mse = float((a - reference).square().mean())
    peak = float(reference.max() - reference.min())
    return float("inf") if mse == 0 else round(10 * torch.log10(torch.tensor(peak * peak / mse)).item(), 2)


def _graphs(pipe) -> dict | None:
    hook = get_cuda_graph_hook(pipe.transformer)
    if hook is None:
        return None
    return {"captured": sum(g is not None for g in hook.graphs.values()),
            "eager": sum(g is None for g in hook.graphs.values())}


def measure(pipe, args: dict, steps: int, contender: Contender, runs: int) -> dict:
    row = {"contender": contender.name, "accel_config": repr(contender.config) if contender.config else None}
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if contender.config is not None:
        accel.accelerate(pipe, contender.config)
    try:
        _, warmup = _call(pipe, args, steps)
        compile_s = first_call_seconds(pipe.transformer)
        times = []
        for _ in range(runs):
            latents, seconds = _call(pipe, args, steps)
            times.append(seconds)
        call = statistics.median(times)
        row.update(warmup_call_s=round(warmup, 2), times_s=[round(t, 4) for t in times],
                   ms_per_call=round(1e3 * call, 1), ms_per_step=round(1e3 * call / steps, 2))
        if compile_s is not None:
            row["first_transformer_call_s"] = round(compile_s, 2)  # regional: every block compiles in it
        if (graphs := _graphs(pipe)) is not None:
            row["cuda_graphs"] = graphs
        if (layers := quantize_report(pipe)) is not None:
            row["layers"] = {kind: len(names) for kind, names in layers.items()}
        if (cache := get_block_cache(pipe)) is not None:
            row["full_cached_calls"] = list(cache.state.counts())
        if contender.schedule is not None:
            row["schedule_full_steps"] = len(contender.schedule)
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    finally:
        if contender.config is not None:
            accel.restore(pipe)
    row["latents"] = latents.float().cpu()
    return row


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v) or "-"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def markdown(report: dict) -> str:
    lines = [f"Compiled runtime, FP8 and fixed cache schedules, {report['setting']}; {report['device']}, torch "
             f"{report['torch']}, diffusers {report['diffusers']}. Median of {report['runs']} timed calls after one "
             f"warm-up (compilation, capture); `torch._dynamo.reset()` between contenders, inductor's disk cache warm "
             f"after the first compile. PSNR of the final latents (peak: the reference's range). Attention of the "
             f"contenders after the first runtime ones: {report.get('attention', '-')}. "
             f"{report.get('note', '')}".rstrip(), "",
             "| contender | ms / step | ms / call | speed-up | warm-up call (s) | first transformer call (s) | "
             "PSNR to stock (dB) | PSNR to reference (dB) | CUDA graphs | full/cached calls | layers | peak GiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        reference = f"{r['psnr_to_reference_db']} ({r['reference']})" if "psnr_to_reference_db" in r else "-"
        lines.append(f"| {r['contender']} | {_cell(r, 'ms_per_step')} | {_cell(r, 'ms_per_call')} | "
                     f"{_cell(r, 'speedup')} | {_cell(r, 'warmup_call_s')} | {_cell(r, 'first_transformer_call_s')} | "
                     f"{_cell(r, 'psnr_to_stock_db')} | {reference} | {_cell(r, 'cuda_graphs')} | "
                     f"{_cell(r, 'full_cached_calls')} | {_cell(r, 'layers')} | {_cell(r, 'peak_gib')} | "
                     f"{r.get('error', r.get('note', ''))} |")
    return "\n".join([*lines, "", *targets(report)]) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(report: dict) -> list[str]:
    """The issues' targets against the rows measured so far."""
    rows = {r["contender"]: r for r in report["rows"] if "ms_per_step" in r}
    lines = []
    runtimes = [r for name, r in rows.items() if name in ("runtime", "runtime full", report.get("pinned_runtime"))]
    if runtimes:
        best = max(runtimes, key=lambda r: r.get("speedup", 0))
        psnr = best.get("psnr_to_stock_db", 0)
        lines.append(f"- Issue 21, the runtime alone >= 1.5x over stock with PSNR >= 40 dB: {best['contender']} "
                     f"{best.get('speedup')}x, {psnr} dB: {_met(best.get('speedup', 0) >= 1.5 and psnr >= 40)}")
    accelerated = [r for name, r in rows.items() if not name.startswith("stock")]
    if accelerated:
        best = max(accelerated, key=lambda r: r.get("speedup", 0))
        lines.append(f"- Issue 21, the best config >= 4x: {best['contender']} {best.get('speedup')}x: "
                     f"{_met(best.get('speedup', 0) >= 4)}")
    base = rows.get(report.get("base", "runtime"))
    if "runtime fp8" in rows and base is not None:
        ratio = round(base["ms_per_step"] / rows["runtime fp8"]["ms_per_step"], 2)
        lines.append(f"- Issue 22, FP8 >= 1.6x over bf16 compiled ({base['contender']}): {ratio}x, PSNR "
                     f"{rows['runtime fp8'].get('psnr_to_reference_db')} dB to it: {_met(ratio >= 1.6)}")
    if "stock again" in rows:
        lines.append(f"- Restore: stock again {rows['stock again'].get('note')}")
    return lines


def _faster(rows: dict, names: list[str]) -> str | None:
    timed = [n for n in names if "ms_per_step" in rows.get(n, {})]
    return min(timed, key=lambda n: rows[n]["ms_per_step"]) if timed else None


def _compare(rows: dict, latents: dict) -> None:
    """PSNR of each contender's latents against its reference contender's, where both have run."""
    for name, row in rows.items():
        reference = row.get("reference")
        if reference not in (None, "stock") and name in latents and reference in latents:
            row["psnr_to_reference_db"] = latent_psnr(latents[name], latents[reference])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2, help="timed calls per contender, after one warm-up call")
    parser.add_argument("--budget-s", type=float, default=450,
                        help="a contender whose rough cost would end past this many seconds from the start is skipped, "
                             "with the reason (stock again still runs)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated contenders to run (stock and stock again always run); default: all but "
                             f"{', '.join(OPT_IN)}")
    parser.add_argument("--pinned-attention", default=None,
                        help="the SDPA kernel of the second runtime contender (default: cudnn; math in --smoke)")
    parser.add_argument("--attention", default=None,
                        help="the attention of the contenders after the first runtime ones (default: the faster of "
                             "'sdpa' and the pinned kernel)")
    parser.add_argument("--smoke", action="store_true", help="a tiny Flux on the CPU, 12 steps, one timed call each")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    smoke = args.smoke
    steps, runs = (12, 1) if smoke else (28, args.runs)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    pinned = args.pinned_attention or ("math" if smoke else "cudnn")
    if smoke:
        torch.set_num_threads(1)
        os.environ.setdefault(CPU_SWITCH, "1")  # FP8 through the reference CPU kernels: the maths, not the speed
    known = [c.name for c in (*first_contenders(pinned), *later_contenders(RUNTIME, steps))]
    wanted = [n for n in known if n not in OPT_IN] if args.configs is None else [
        n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(known) - {"stock again"})
    if unknown:
        parser.error(f"unknown --configs {unknown}; valid: {', '.join(known)}")
    import diffusers

    pipe, call_args = build(smoke, device, dtype)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "runs": runs, "build_s": round(time.perf_counter() - start, 1),
              "setting": ("tiny Flux (smoke), float32, 64 px" if smoke else
                          "FLUX.1-dev architecture, random weights, bf16, 1024 px") + f", {steps} steps, guidance 3.5, "
                         "batch 1, latents out", "rows": []}
    if smoke:
        report["note"] = ("CPU: the CUDA-graph hook is applied but runs eagerly, FP8 runs the reference kernels; "
                          "timings mean nothing.")
    report["pinned_runtime"] = f"runtime {pinned}"
    print(f"[flux_runtime] built in {report['build_s']} s", flush=True)
    rows, latents = {}, {}

    def run(contender: Contender) -> None:
        elapsed = time.perf_counter() - start
        if contender.name not in ("stock", "stock again") and contender.name not in wanted:
            return
        if contender.name != "stock again" and elapsed + contender.cost_s > args.budget_s:
            row = {"contender": contender.name,
                   "error": f"skipped: {elapsed:.0f} s spent, about {contender.cost_s:.0f} s more would pass "
                            f"--budget-s {args.budget_s:.0f}"}
        else:
            try:
                row = measure(pipe, call_args, steps, contender, runs)
                out = latents[contender.name] = row.pop("latents")
                stock = rows.get("stock")
                if stock is not None and contender.name != "stock":
                    row["speedup"] = round(stock["ms_per_step"] / row["ms_per_step"], 2)
                    row["psnr_to_stock_db"] = latent_psnr(out, latents["stock"])
                if contender.reference is not None:
                    row["reference"] = contender.reference  # its PSNR once both have run (`_compare`)
                if contender.name == "stock again" and "stock" in latents:
                    row["note"] = ("identical to stock: restore is exact" if torch.equal(out, latents["stock"])
                                   else "DIFFERS from stock: a restore left something behind")
            except Exception as err:  # one failing contender must not lose the others
                traceback.print_exc()
                row = {"contender": contender.name,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
        rows[contender.name] = row
        report["rows"].append(row)
        _compare(rows, latents)
        print(json.dumps(row), flush=True)
        (args.out / "flux_runtime.json").write_text(json.dumps(report, indent=1))
        (args.out / "flux_runtime.md").write_text(markdown(report))
        torch._dynamo.reset()  # the next contender compiles its own graphs (inductor's disk cache stays)
        if device == "cuda":
            torch.cuda.empty_cache()

    for contender in first_contenders(pinned):
        run(contender)
    attention = args.attention
    if attention is None:
        best = _faster(rows, ["runtime", f"runtime {pinned}"])
        attention = pinned if best == f"runtime {pinned}" else "sdpa"
    base = f"runtime {pinned}" if attention == pinned else "runtime"
    report.update(attention=attention, base=base)
    for contender in later_contenders(replace(RUNTIME, attention=attention), steps, base):
        run(contender)
    run(STOCK_AGAIN)
    print(f"[flux_runtime] {time.perf_counter() - start:.0f} s")
    print(markdown(report))


if __name__ == "__main__":
    main()
