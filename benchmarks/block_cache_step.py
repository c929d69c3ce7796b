"""Block cache on the GPU: end to end and per denoiser call, eagerly (host-side decision) and under CUDA
graphs (decision on the GPU with conditional nodes where torch has them, else per-block graphs decided on
the host; each row records which path ran), and the embedded model's fidelity.

1. End to end, SD1.5 architecture (random weights, fp16, 512 px, CFG 7.5, DPM-Solver++ 20 steps), one
   process: stock eager; a CUDA graph of the whole UNet; the block cache eagerly and with graphs at a few
   thresholds. Median of 5 calls after warm-up, PSNR to stock and (graphs) to the same cache eagerly, full /
   cached calls, CUDA-graph replays per image.
2. Step level, per denoiser call (fp16, CFG batch 2): an SD1.5-architecture UNet at 512 px and a
   PixArt-XL-sized DiT (28 blocks, width 1152) at 512 px, random weights. "full" is a block cache that
   never skips (threshold 0), "cached" one that always skips after the first step (threshold 1e9); each
   eagerly and under the graph hook; plus the denoiser without the cache. The graph replays of the
   cached loop run under `torch.cuda.set_sync_debug_mode("error")` (the per-block path syncs once a call).
3. The embedded model (trained weights, 32 px, its own DPM-Solver++ multistep scheduler, 50 steps; results
   before this version called it DDIM 50): stock vs block cache at several thresholds, eager and with CUDA
   graphs: seconds per image, cached steps, PSNR to the stock output and graphs vs eager.

    python3 benchmarks/block_cache_step.py --out DIR [--smoke]   (smoke: tiny sizes on the CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import accel
from accel import AccelConfig, RuntimeConfig
from accel.cache import BlockCacheConfig, get_block_cache
from accel.cache.block_cache import conditional_nodes_supported
from accel.quality.metrics import psnr
from accel.runtime import apply_cuda_graph, remove_cuda_graph
from accel.session import get_session


class _Holder:
    """A pipeline-shaped holder for one denoiser: `accelerate` needs only its `.unet` / `.transformer`."""

    def __init__(self, **modules):
        self.__dict__.update(modules)

    def __call__(self):
        raise NotImplementedError


def _unet(smoke: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    from apps.bench_archs import SD15_UNET

    config = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=32) if smoke else SD15_UNET
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).eval()
    size, context = (8, 32) if smoke else (64, 768)
    g = torch.Generator(device).manual_seed(0)
    inputs = dict(sample=torch.randn(2, 4, size, size, generator=g, device=device, dtype=dtype),
                  timestep=torch.tensor(500, device=device),
                  encoder_hidden_states=torch.randn(2, 77, context, generator=g, device=device, dtype=dtype),
                  return_dict=False)
    return unet, inputs


def _dit(smoke: bool, device, dtype):
    from diffusers import PixArtTransformer2DModel

    config = dict(sample_size=8, num_layers=4, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
                  cross_attention_dim=16) if smoke else dict(sample_size=64, num_layers=28, attention_head_dim=72,
                                                             num_attention_heads=16, caption_channels=4096, cross_attention_dim=1152)
    with torch.device(device):
        transformer = PixArtTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, **config).to(dtype).eval()
    size = config["sample_size"]
    g = torch.Generator(device).manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, size, size, generator=g, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(2, 120, config["caption_channels"], generator=g, device=device, dtype=dtype),
                  timestep=torch.tensor([500, 500], device=device),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    return transformer, inputs


def _loop(holder, denoiser, inputs, steps: int, sync_check: bool = False) -> float:
    """Seconds per call over one loop of `steps` calls, driven as a pipeline loop drives them."""
    session = get_session(holder)
    cuda = next(denoiser.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    if session is not None:
        session.begin_call(steps)
    if sync_check and cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for i in range(steps):
                if session is not None:
                    session.step_index = i
                denoiser(**inputs)
    finally:
        if sync_check and cuda:
            torch.cuda.set_sync_debug_mode("default")
        if session is not None:
            session.end_call()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def step_level(name: str, denoiser, inputs, attr: str, steps: int, repeats: int) -> list[dict]:
    rows = []
    for cache_name, threshold in (("none", None), ("full", 0.0), ("cached", 1e9)):
        for graph in (False, True):
            holder = _Holder(**{attr: denoiser})
            if threshold is not None:
                accel.accelerate(holder, AccelConfig(cache=BlockCacheConfig(threshold=threshold)))
            hook = apply_cuda_graph(denoiser) if graph else None
            row = {"denoiser": name, "cache": cache_name, "graph": graph}
            try:
                times = [_loop(holder, denoiser, inputs, steps) for _ in range(repeats)]  # the first one captures
                row["ms_per_call"] = round(1e3 * statistics.median(times[1:]), 3)
                cache = get_block_cache(holder)
                if cache is not None:  # the last timed loop's calls (the sync check below may stop mid-loop)
                    row["full_cached"] = list(cache.state.counts())
                    if graph:
                        row["graph_path"] = cache.graph_path
                        row["block_graphs"] = len(cache.block_graphs.captured())
                if graph:
                    row["graphs_captured"] = sum(g is not None for g in hook.graphs.values())
                    try:
                        _loop(holder, denoiser, inputs, steps, sync_check=True)
                        row["sync_free"] = True
                    except RuntimeError as err:
                        row["sync_free"] = f"no: {str(err).splitlines()[0][:120]}"
            except Exception as err:  # one failing cell must not lose the others
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            finally:
                if graph:
                    remove_cuda_graph(denoiser)
                if accel.is_accelerated(holder):
                    accel.restore(holder)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _psnr(a, b) -> float:
    return round(float(psnr(a.float().cpu(), b.float().cpu()).mean()), 2)


def _cache_fields(pipe) -> dict:
    cache = get_block_cache(pipe)
    if cache is None:
        return {}
    fields = {"full_cached": list(cache.state.counts())}
    if cache.graph_path is not None:
        fields.update(graph_path=cache.graph_path, block_graphs=len(cache.block_graphs.captured()))
    return fields


@contextmanager
def _count_replays(counter: list):
    """Count torch.cuda.CUDAGraph replays (whole-UNet and per-block graphs alike)."""
    replay = torch.cuda.CUDAGraph.replay

    def counted(self):
        counter.append(1)
        return replay(self)

    torch.cuda.CUDAGraph.replay = counted
    try:
        yield
    finally:
        torch.cuda.CUDAGraph.replay = replay


def _configs(thresholds) -> list[tuple[str, AccelConfig | None, float | None]]:
    configs = [("stock", None, None), ("graph", AccelConfig(runtime=RuntimeConfig(cuda_graph=True)), None)]
    for threshold in thresholds:
        cache = BlockCacheConfig(threshold=threshold)
        configs += [(f"block{threshold}", AccelConfig(cache=cache), threshold),
                    (f"block{threshold}+graph", AccelConfig(cache=cache, runtime=RuntimeConfig(cuda_graph=True)), threshold)]
    return configs


def end_to_end(smoke: bool, device, dtype, thresholds, runs: int, warmup: int) -> list[dict]:
    """SD1.5 architecture, DPM-Solver++ 20 steps, 512 px, CFG 7.5 (smoke: the embedded model, 32 px, 8 steps)."""
    from diffusers import DPMSolverMultistepScheduler

    from apps.bench import time_pipeline
    from apps.bench_archs import build_pipeline

    pipe = build_pipeline("embedded" if smoke else "sd15", device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # DPM-Solver++ (2M)
    size, steps = (32, 8) if smoke else (512, 20)
    args = dict(prompt="a photo of an astronaut riding a horse on mars", num_inference_steps=steps, guidance_scale=7.5,
                height=size, width=size, output_type="pt")
    rows, images = [], {}
    for name, config, threshold in _configs(thresholds):
        row = {"config": name, "steps": steps, "size": size}
        try:
            if config is not None:
                accel.accelerate(pipe, config)
            timing = time_pipeline(pipe, args, runs=runs, warmup=warmup, seed=0)
            images[name] = timing["images"]
            row.update(median_ms=round(1e3 * timing["median_s"], 1), first_call_s=round(timing["first_call_s"], 2))
            if name != "stock" and "stock" in images:
                row["speedup"] = round(rows[0]["median_ms"] / row["median_ms"], 2)
                row["psnr_to_stock_db"] = _psnr(images[name], images["stock"])
            eager = f"block{threshold}"
            if name.endswith("+graph") and eager in images:
                row["psnr_to_eager_cache_db"] = _psnr(images[name], images[eager])
                row["max_abs_to_eager_cache"] = round(float((images[name].float() - images[eager].float()).abs().max()), 5)
            row.update(_cache_fields(pipe))
            if name.endswith("graph") and device == "cuda":
                replays = []
                with _count_replays(replays):
                    pipe(generator=torch.Generator(device).manual_seed(0), **args)
                row["graph_replays_per_image"] = len(replays)
        except Exception as err:  # one failing config must not lose the others
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            if accel.is_accelerated(pipe):
                accel.restore(pipe)
            if device == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def embedded(device, dtype, steps: int, thresholds, runs: int) -> tuple[str, list[dict]]:
    """The embedded model with its own scheduler (DPM-Solver++ multistep), 32 px: (setting, rows)."""
    from apps.bench_archs import build_pipeline

    pipe = build_pipeline("embedded", device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    setting = f"{type(pipe.scheduler).__name__} {steps} steps, 32 px, guidance 7.5 (the pipeline's default)"

    def generate():
        g = torch.Generator("cpu").manual_seed(0)
        return pipe("a photo of a horse", num_inference_steps=steps, generator=g, output_type="pt").images

    def timed():
        out = generate()
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            out = generate()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return out, statistics.median(times)

    rows, images = [], {}
    for name, config, threshold in _configs(thresholds):
        row = {"config": name}
        try:
            if config is not None:
                accel.accelerate(pipe, config)
            images[name], seconds = timed()
            row["s_per_image"] = round(seconds, 4)
            if name != "stock":
                row.update(speedup=round(rows[0]["s_per_image"] / seconds, 2), psnr_db=_psnr(images[name], images["stock"]))
            eager = f"block{threshold}"
            if name.endswith("+graph") and eager in images:
                row["psnr_to_eager_cache_db"] = _psnr(images[name], images[eager])
            row.update(_cache_fields(pipe))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            if accel.is_accelerated(pipe):
                accel.restore(pipe)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return setting, rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "identical"
    return str(value)


def markdown(report: dict) -> str:
    lines = [f"Block cache: {report['device']}, torch {report['torch']}, CUDA-graph conditional nodes: "
             f"{report['conditional_nodes']}", ""]
    e2e = report.get("sd15_end_to_end")
    if e2e:
        first = e2e[0]
        lines += [f"End to end, {'embedded model (smoke)' if report['smoke'] else 'SD1.5 architecture, fp16'}, "
                  f"{first['size']} px, CFG 7.5, DPM-Solver++ {first['steps']} steps, median of the timed calls:", "",
                  "| config | median (ms) | speed-up | first call (s) | full/cached | graph path | graph replays / image "
                  "| PSNR to stock (dB) | PSNR to eager cache (dB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in e2e:
            lines.append(f"| {r['config']} | {_cell(r.get('median_ms', r.get('error')))} | {_cell(r.get('speedup'))} | "
                         f"{_cell(r.get('first_call_s'))} | {_cell(r.get('full_cached'))} | {_cell(r.get('graph_path'))} | "
                         f"{_cell(r.get('graph_replays_per_image'))} | {_cell(r.get('psnr_to_stock_db'))} | "
                         f"{_cell(r.get('psnr_to_eager_cache_db'))} |")
        lines.append("")
    for key in ("sd15_unet_512", "pixart_xl_dit_512"):
        if report.get(key):
            lines += [f"Per denoiser call ({key}, batch 2): ms per call", "",
                      "| cache | graph | ms / call | full/cached | graph path | block graphs | sync-free |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in report[key]:
                lines.append(f"| {r['cache']} | {r['graph']} | {_cell(r.get('ms_per_call', r.get('error')))} | "
                             f"{_cell(r.get('full_cached'))} | {_cell(r.get('graph_path'))} | {_cell(r.get('block_graphs'))} | "
                             f"{_cell(r.get('sync_free'))} |")
            lines.append("")
    if report.get("embedded"):
        lines += [f"Embedded model, {report['embedded_setting']}:", "",
                  "| config | s / image | speed-up | full/cached | graph path | PSNR to stock (dB) | PSNR to eager cache (dB) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["embedded"]:
            lines.append(f"| {r['config']} | {_cell(r.get('s_per_image', r.get('error')))} | {_cell(r.get('speedup'))} | "
                         f"{_cell(r.get('full_cached'))} | {_cell(r.get('graph_path'))} | {_cell(r.get('psnr_db'))} | "
                         f"{_cell(r.get('psnr_to_eager_cache_db'))} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.float16
    if smoke:
        torch.set_num_threads(1)
        # Take the graph paths as on a GPU: on the CPU every per-block capture fails and its block runs eagerly.
        from accel.cache.block_cache import BlockCache

        BlockCache._replayable = staticmethod(lambda sample: True)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "conditional_nodes": conditional_nodes_supported(), "smoke": smoke}
    start = time.perf_counter()

    def save(section: str):
        (args.out / "block_cache_step.json").write_text(json.dumps(report, indent=1))
        (args.out / "block_cache_step.md").write_text(markdown(report))
        print(f"[block_cache_step] {section} done at {time.perf_counter() - start:.0f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    thresholds = (0.05, 0.1, 0.2)
    report["sd15_end_to_end"] = end_to_end(smoke, device, dtype, thresholds, runs=1 if smoke else 5, warmup=1 if smoke else 2)
    save("end to end")
    steps, repeats = (4, 2) if smoke else (20, 4)
    unet, inputs = _unet(smoke, device, dtype)
    report["sd15_unet_512"] = step_level("sd15-unet", unet, inputs, "unet", steps, repeats)
    del unet, inputs
    save("SD1.5 UNet step level")
    report["embedded_setting"], report["embedded"] = embedded(device, dtype, 8 if smoke else 50, (0.05, 0.1, 0.2, 0.3),
                                                              1 if smoke else 5)
    save("embedded model")
    transformer, inputs = _dit(smoke, device, dtype)
    report["pixart_xl_dit_512"] = step_level("pixart-xl-dit", transformer, inputs, "transformer", steps, repeats)
    del transformer, inputs
    save("PixArt DiT step level")
    print()
    print(markdown(report))


if __name__ == "__main__":
    main()
