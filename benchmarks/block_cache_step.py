"""Block cache on the GPU: what a cached step costs eagerly (host-side decision) and in a CUDA graph
(decision on the GPU, conditional nodes), and the embedded model end to end.

1. Step level, per denoiser call (fp16, CFG batch 2): an SD1.5-architecture UNet at 512 px and a
   PixArt-XL-sized DiT (28 blocks, width 1152) at 512 px, random weights. "full" is a block cache that
   never skips (threshold 0), "cached" one that always skips after the first step (threshold 1e9); each
   eagerly and under the graph hook; plus the denoiser without the cache. The graph replays of the
   cached loop run under `torch.cuda.set_sync_debug_mode("error")`.
2. The embedded model (trained weights, 32 px, DDIM 50): stock vs block cache at several thresholds,
   eager and with CUDA graphs: seconds per image, cached steps, PSNR to the stock output.

    python3 benchmarks/block_cache_step.py --out DIR [--smoke]   (smoke: tiny models on the CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import accel
from accel import AccelConfig, RuntimeConfig
from accel.cache import BlockCacheConfig, get_block_cache
from accel.cache.block_cache import conditional_nodes_supported
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
                if graph:
                    row["graphs_captured"] = sum(g is not None for g in hook.graphs.values())
                    try:
                        _loop(holder, denoiser, inputs, steps, sync_check=True)
                        row["sync_free"] = True
                    except RuntimeError as err:
                        row["sync_free"] = f"no: {str(err).splitlines()[0][:120]}"
                cache = get_block_cache(holder)
                if cache is not None:
                    row["full_cached"] = list(cache.state.counts())
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


def embedded(device, dtype, steps: int, thresholds, runs: int) -> list[dict]:
    from apps.bench_archs import build_pipeline

    from accel.quality.metrics import psnr

    pipe = build_pipeline("embedded", device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)

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

    reference, seconds = timed()
    rows = [{"config": "stock", "s_per_image": round(seconds, 4)}]
    print(json.dumps(rows[-1]), flush=True)
    configs = [("graph", AccelConfig(runtime=RuntimeConfig(cuda_graph=True)), None)]
    for threshold in thresholds:
        cache = BlockCacheConfig(threshold=threshold)
        configs += [(f"block{threshold}", AccelConfig(cache=cache), threshold),
                    (f"block{threshold}+graph", AccelConfig(cache=cache, runtime=RuntimeConfig(cuda_graph=True)), threshold)]
    for name, config, threshold in configs:
        row = {"config": name}
        try:
            accel.accelerate(pipe, config)
            out, seconds = timed()
            row.update(s_per_image=round(seconds, 4), speedup=round(rows[0]["s_per_image"] / seconds, 2),
                       psnr_db=round(float(psnr(out.float().cpu(), reference.float().cpu())), 2))
            cache = get_block_cache(pipe)
            if cache is not None:
                row["full_cached"] = list(cache.state.counts())
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            if accel.is_accelerated(pipe):
                accel.restore(pipe)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to check the script runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.float16
    if smoke:
        torch.set_num_threads(1)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "conditional_nodes": conditional_nodes_supported()}
    steps, repeats = (4, 2) if smoke else (20, 4)
    unet, inputs = _unet(smoke, device, dtype)
    report["sd15_unet_512"] = step_level("sd15-unet", unet, inputs, "unet", steps, repeats)
    del unet
    transformer, inputs = _dit(smoke, device, dtype)
    report["pixart_xl_dit_512"] = step_level("pixart-xl-dit", transformer, inputs, "transformer", steps, repeats)
    del transformer
    if device == "cuda":
        torch.cuda.empty_cache()
    report["embedded_ddim"] = embedded(device, dtype, 4 if smoke else 50, (0.05, 0.1, 0.2, 0.3), 1 if smoke else 5)
    (args.out / "block_cache_step.json").write_text(json.dumps(report, indent=1))

    print("\nstep level, ms per denoiser call (fp16, batch 2):")
    for key in ("sd15_unet_512", "pixart_xl_dit_512"):
        for row in report[key]:
            print(f"  {row['denoiser']:14s} cache={row['cache']:6s} graph={row['graph']!s:5s} "
                  f"{row.get('ms_per_call', row.get('error'))} {row.get('full_cached', '')} sync_free={row.get('sync_free', '-')}")
    print("embedded model, DDIM 50, 32 px:")
    for row in report["embedded_ddim"]:
        print(f"  {row['config']:16s} {row.get('s_per_image', row.get('error'))} s  x{row.get('speedup', 1.0)}  "
              f"psnr={row.get('psnr_db', '-')}  full/cached={row.get('full_cached', '-')}")


if __name__ == "__main__":
    main()
