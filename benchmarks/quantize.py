"""FP8 / INT8 quantized denoisers on the GPU (issue 22): quality on the embedded model, UNet step and end to end.

1. The embedded model (trained weights, 32 px, DPM-Solver++ 20 steps, guidance 4, fp16), eager: the 16-bit baseline,
   FP8, INT8, the `fast` preset's sampler at 16 bit and with FP8 (`fast-fp8` without its compilation, which does
   not change the images); PSNR / SSIM to the 16-bit output, prompt adherence and Frechet distance (CIFAR-10
   classifier) over --quality-n prompts (the harness of `accel eval`; needs the CIFAR-10 test archive, `.data/`).
2. SD1.5 architecture (random weights, fp16, 512 px, CFG 7.5, DPM-Solver++ 20 steps), one process: stock diffusers,
   then the `balanced` preset's runtime (SDPA, channels-last, full torch.compile, CUDA graphs of UNet, VAE decoder and
   text encoders) at 16 bit, with FP8, with INT8 and with FP8 on the 1x1 convolutions too. Per config: end-to-end
   median of 5 calls after warm-up, the first call (compilation and capture; the UNet's compile alone), PSNR to stock,
   peak memory, what was quantized, and the UNet step at CFG batch 2: the median UNet call of --unet-calls more
   pipeline calls, timed around each call with CUDA events (graph replays under the compiled runtime; timing the
   UNet inside the pipeline keeps its compiled code from recompiling for other arguments).
Results are written after every config (quantize.json, quantize.md in --out), so a run cut short keeps what it did.

    python3 benchmarks/quantize.py --out DIR [--smoke]   (smoke: the CPU with ACCEL_QUANTIZE_CPU=1, tiny, eager)
    python3 benchmarks/quantize.py --out DIR --quality-model dit --configs ""   (the quality part alone, on the DiT)
    python3 benchmarks/quantize.py --out DIR --quality-n 0 --arch sdxl --configs "stock,compiled 16-bit,compiled fp8"
        (issue 22's SDXL line: SDXL architecture, 1024 px, DPM-Solver++ 30 steps, end to end)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config

import accel
from accel import AccelConfig, RuntimeConfig
from accel.embedded import EMBEDDED_GUIDANCE, EMBEDDED_STEPS
from accel.embedded_dit import EMBEDDED_DIT_DIR, EMBEDDED_DIT_GUIDANCE, EMBEDDED_DIT_STEPS
from accel.quality.cifar import load_cifar10
from accel.quality.evaluate import evaluate
from accel.quality.metrics import psnr
from accel.runtime import first_call_seconds, quantize_report
from accel.runtime.quantize import CPU_SWITCH
from apps.bench import time_pipeline
from apps.bench_archs import build_pipeline

PROMPT = "a photo of an astronaut riding a horse on mars"


def quality_pipeline(model: str, device: str, dtype: torch.dtype):
    """The trained model judged for quality, with its default guidance: the embedded UNet model or DiT."""
    if model == "embedded":
        return build_pipeline("embedded", device=device, dtype=dtype), EMBEDDED_GUIDANCE
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(EMBEDDED_DIT_DIR, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, EMBEDDED_DIT_GUIDANCE


def quality(model: str, device: str, dtype: torch.dtype, n: int, steps: int, batch_size: int,
            references: int | None) -> list[dict]:
    configs = {
        "fp8": AccelConfig(runtime=RuntimeConfig(quantize="fp8")),
        "int8": AccelConfig(runtime=RuntimeConfig(quantize="int8")),
    }
    if model == "embedded":  # the `fast` preset's sampler is a betas-schedule solver: the UNet model's alone
        fast = accel.get_preset("fast")
        configs["fast sampler, 16 bit"] = AccelConfig(sampler=fast.sampler)
        configs["fast sampler + fp8 (fast-fp8, eager)"] = AccelConfig(sampler=fast.sampler,
                                                                     runtime=RuntimeConfig(quantize="fp8"))
    pipe, guidance = quality_pipeline(model, device, dtype)
    reference_images = load_cifar10("test", limit=references)[0]  # decoded once for every config's Frechet distance
    options = dict(n=n, num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size,
                   reference_images=reference_images)
    base = evaluate(pipe, return_images=True, **options)
    rows = [{"config": "16-bit baseline", **base["baseline"]}]
    for name, config in configs.items():
        result = evaluate(pipe, config=config, baseline=base, **options)
        rows.append({"config": name, "accel_config": repr(config), **result["accelerated"]})
        print(f"[quantize] {model} {name}: PSNR {rows[-1]['psnr_db']:.2f} dB, adherence {rows[-1].get('adherence')}",
              flush=True)
    return rows


def _images(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255


def _unet_call_ms(pipe, args: dict, calls: int) -> float:
    """The median milliseconds of the UNet calls in `calls` pipeline calls (CUDA events; the host clock on a CPU)."""
    cuda = pipe.device.type == "cuda"

    def stamp():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    marks = []
    handles = [pipe.unet.register_forward_pre_hook(lambda *_: marks.append([stamp()])),
               pipe.unet.register_forward_hook(lambda *_: marks[-1].append(stamp()))]
    try:
        for _ in range(calls):
            pipe(**args)
    finally:
        for handle in handles:
            handle.remove()
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) if cuda else (end - start) * 1e3 for start, end in marks)


def _measure(pipe, config, args: dict, unet_calls: int) -> dict:
    """One config on the pipeline: end to end, the UNet step, the first calls, the quantized layers."""
    if config is not None:
        accel.accelerate(pipe, config)
    try:
        timing = time_pipeline(pipe, args, runs=5, warmup=2, seed=0)
        timing["unet_step_ms"] = _unet_call_ms(pipe, args, unet_calls)
        timing["unet_first_call_s"] = first_call_seconds(pipe.unet)
        report = quantize_report(pipe)
        timing["layers"] = None if report is None else {reason: len(layers) for reason, layers in report.items()}
    finally:
        if config is not None:
            accel.restore(pipe)
    return timing


@contextlib.contextmanager
def _settings(settings: dict):
    """Run under `settings`: {"cudnn_benchmark": bool, "inductor": {option: value}}; both put back after."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = settings.get("cudnn_benchmark", benchmark)
    try:
        with torch._inductor.config.patch(settings.get("inductor", {})):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def speed(device: str, dtype: torch.dtype, arch: str, size: int, steps: int, unet_calls: int, runtime: RuntimeConfig,
          names: list[str], rows: list[dict], save) -> None:
    from diffusers import DPMSolverMultistepScheduler

    configs = {
        "stock": None,
        "compiled 16-bit": AccelConfig(runtime=runtime),
        "compiled fp8": AccelConfig(runtime=replace(runtime, quantize="fp8")),
        "compiled int8": AccelConfig(runtime=replace(runtime, quantize="int8")),
        "compiled fp8 + 1x1 convs": AccelConfig(runtime=replace(runtime, quantize="fp8", quantize_convs=True)),
        # only the layers of >= 3,072 outputs, where one layer at a time gained (benchmarks/runtime/fp8_linear.py)
        "compiled fp8 wide": AccelConfig(runtime=replace(runtime, quantize="fp8", quantize_min_out_features=3072)),
    }
    # Process-wide settings some configs run under (their compile happens at their first call, inside them):
    # cuDNN's autotuner for the convolutions, and inductor's options for conv-heavy UNets from diffusers' torch.compile
    # guide (1x1 convolutions as matmuls, coordinate-descent tuning of the Triton kernels, no epilogue fusion).
    tuned = {"cudnn_benchmark": True, "inductor": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                                                   "coordinate_descent_check_all_directions": True,
                                                   "epilogue_fusion": False}}
    settings = {"compiled 16-bit cudnn-bench": {"cudnn_benchmark": True}, "compiled 16-bit tuned": tuned,
                "compiled fp8 wide tuned": tuned}
    configs["compiled 16-bit cudnn-bench"] = configs["compiled 16-bit tuned"] = configs["compiled 16-bit"]
    configs["compiled fp8 wide tuned"] = configs["compiled fp8 wide"]
    pipe = build_pipeline(arch, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    args = {"prompt": PROMPT, "num_inference_steps": steps, "guidance_scale": 7.5, "height": size, "width": size}
    stock = None
    for name in names:
        print(f"[quantize] {arch} {size}px: {name} ...", flush=True)
        torch._dynamo.reset()
        row = {"config": name, "accel_config": repr(configs[name]), "settings": settings.get(name)}
        try:
            with _settings(settings.get(name) or {}):
                timing = _measure(pipe, configs[name], args, unet_calls)
        except Exception as err:  # one failing config must not lose the others
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
            print(f"[quantize]   {row['error']}", flush=True)
            save()
            continue
        images = _images(timing.pop("images"))
        row.update(timing)
        if name == "stock":
            stock = (images, row["median_s"])
        if stock is not None:
            row["psnr_to_stock_db"] = float(psnr(images, stock[0]).mean())
            row["speedup"] = stock[1] / row["median_s"]
        rows.append(row)
        print(f"[quantize]   median {row['median_s'] * 1e3:.1f} ms, UNet step {row.get('unet_step_ms')}, first call "
              f"{row['first_call_s']:.1f} s, layers {row['layers']}", flush=True)
        save()


def _cell(row: dict, key: str, fmt: str) -> str:
    return "-" if row.get(key) is None else format(row[key], fmt)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"Quantized denoisers, {meta['device']}, torch {meta['torch']}, `{meta['command']}`", ""]
    if report.get("embedded"):
        dit = meta.get("quality_model") == "dit"
        model = (f"Embedded DiT mini-sd3-cifar10, {meta['quality_n']} CIFAR-10 prompts, FlowMatch Euler "
                 f"{meta['quality_steps']} steps, guidance {EMBEDDED_DIT_GUIDANCE}" if dit else
                 f"Embedded model, {meta['quality_n']} CIFAR-10 prompts, DPM-Solver++ {meta['quality_steps']} steps, "
                 f"guidance {EMBEDDED_GUIDANCE}")
        lines += [f"{model}, eager, against its 16-bit output:", "",
                  "| config | PSNR (dB) | SSIM | adherence | change (points) | Frechet distance |",
                  "| --- | --- | --- | --- | --- | --- |"]
        base = report["embedded"][0].get("adherence")
        for r in report["embedded"]:
            change = "-" if base is None or r.get("adherence") is None else f"{(r['adherence'] - base) * 100:+.1f}"
            lines.append(f"| {r['config']} | {_cell(r, 'psnr_db', '.2f')} | {_cell(r, 'ssim', '.4f')} | "
                         f"{_cell(r, 'adherence', '.3f')} | {change} | {_cell(r, 'frechet_distance', '.1f')} |")
        lines.append("")
    if report.get("speed"):
        weights = "trained" if meta["arch"] == "embedded" else "random"
        lines += [f"{meta['arch']} architecture ({weights} weights), {meta['size']} px, DPM-Solver++ {meta['steps']} steps, "
                  f"CFG 7.5, {meta['dtype']}; UNet step: CFG batch 2, the median UNet call of {meta['unet_calls']} pipeline "
                  f"calls:", "",
                  "| config | end to end (ms) | speed-up | UNet step (ms) | first call (s) | UNet compile (s) | peak GiB "
                  "| PSNR to stock (dB) | layers |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["speed"]:
            if "error" in r:
                lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * 7)
                continue
            lines.append(f"| {r['config']} | {r['median_s'] * 1e3:.1f} | {_cell(r, 'speedup', '.2f')}x | "
                         f"{_cell(r, 'unet_step_ms', '.2f')} | {r['first_call_s']:.1f} | {_cell(r, 'unet_first_call_s', '.1f')} | "
                         f"{_cell(r, 'peak_mem_gib', '.2f')} | {_cell(r, 'psnr_to_stock_db', '.1f')} | {r['layers'] or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the CPU, the embedded architecture, no compilation")
    parser.add_argument("--quality-n", type=int, default=1000, help="prompts on the embedded model (0: skip)")
    parser.add_argument("--unet-calls", type=int, default=10, help="pipeline calls whose UNet calls are timed")
    parser.add_argument("--configs", default="stock,compiled 16-bit,compiled fp8,compiled int8,compiled fp8 + 1x1 convs",
                        help="speed configs, comma-separated ('' skips the speed part)")
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15",
                        help="the speed part's architecture: sd15 (512 px, 20 steps) or sdxl (1024 px, 30 steps)")
    parser.add_argument("--quality-model", choices=("embedded", "dit"), default="embedded",
                        help="the trained model of the quality part: the embedded UNet model (DPM-Solver++ 20 steps, "
                             "guidance 4) or the embedded DiT mini-sd3-cifar10 (FlowMatch Euler 28 steps, guidance 5)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        os.environ.setdefault(CPU_SWITCH, "1")
        torch.set_num_threads(1)
        device, dtype, arch, size, steps = "cpu", torch.float32, "embedded", 32, 2
        runtime = RuntimeConfig(cuda_graph=True, components=("denoiser", "vae", "text_encoder"))  # graphs fall back to eager
        quality_n, quality_steps, batch_size, references = min(args.quality_n, 20), 2, 10, 200
    else:
        device, dtype, arch = "cuda", torch.float16, args.arch
        size, steps = (1024, 30) if arch == "sdxl" else (512, 20)
        runtime = accel.get_preset("balanced").runtime
        quality_n, quality_steps, batch_size, references = args.quality_n, EMBEDDED_STEPS, 250, None
    if args.quality_model == "dit" and not args.smoke:
        quality_steps = EMBEDDED_DIT_STEPS
    report = {"meta": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                       "command": "python3 " + " ".join(sys.argv), "arch": arch, "size": size, "steps": steps,
                       "dtype": str(dtype).replace("torch.", ""), "unet_calls": args.unet_calls, "quality_n": quality_n,
                       "quality_steps": quality_steps, "quality_model": args.quality_model,
                       "smoke": args.smoke}}
    start = time.perf_counter()

    def save():
        report["meta"]["elapsed_s"] = round(time.perf_counter() - start, 1)
        text = json.dumps(report, indent=1, default=str).replace("Infinity", "null")  # identical images: strict JSON
        (args.out / "quantize.json").write_text(text)
        (args.out / "quantize.md").write_text(markdown(report))

    if quality_n:
        report["embedded"] = quality(args.quality_model, device, dtype, quality_n, quality_steps, batch_size, references)
        save()
    report["speed"] = []
    if args.configs:
        speed(device, dtype, arch, size, steps, args.unet_calls, runtime, args.configs.split(","), report["speed"], save)
    save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
