"""A LoRA swap on an accelerated pipeline (issue 23): no second compile, next image at once.

    source benchmarks/device_setup.sh && python3 benchmarks/runtime/lora_swap.py --out $OUT/lora   # GPU, ~200 s
    ... lora_swap.py --arch sdxl --budget 300 --out $OUT/lora-sdxl                                  # SDXL, 1024 px
    python3 benchmarks/runtime/lora_swap.py --smoke --out /tmp/lora                              # CPU, embedded model

SD1.5 architecture with random weights, fp16, 512 px (`--arch sdxl`: SDXL, 1024 px), the `balanced` preset (DPM-Solver++ 20 steps, full compile,
CUDA graphs of UNet, VAE decoder and text encoder) with `RuntimeConfig(lora_hotswap=True, lora_max_rank=16)`, and two
random LoRAs built here on the UNet's attention projections: A (rank 8, loaded before `accelerate`) and B (rank 16,
swapped in with `accel.swap_lora`). Recorded: first call, steady state, the swap itself, the next image after it, a
weight change (`accel.set_lora_scale`) and the image after it; dynamo's graph count and the CUDA graphs captured
before and after (a recompilation or a new capture shows there); PSNR of the swapped pipeline's images against the
eager pipeline (same sampler) with B loaded plainly, and against a fresh `accelerate` with B (the preset without
hotswap) when the time budget leaves room for its compile (about the first call again). `--smoke`: the embedded
model at 32 px, 2 steps, on the CPU, compiled into dynamo's "eager" backend, so graphs are still traced and counted.
Writes lora_swap.json and lora_swap.md to --out after every phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import accel  # noqa: E402
from accel.quality.metrics import psnr  # noqa: E402
from accel.runtime import get_cuda_graph_hook  # noqa: E402
from tiny import random_lora  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"
RANK_A, RANK_B, LORA_STD = 8, 16, 0.05
SCALE = 0.7


def _graphs(pipe) -> int:
    """CUDA graphs captured so far across the pipeline's modules."""
    modules = [pipe.unet, pipe.vae.decoder, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return sum(len(hook.graphs) for m in modules if m is not None and (hook := get_cuda_graph_hook(m)) is not None)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _psnr(a, b) -> float:
    return float(psnr(torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2)).mean())


def markdown(report: dict) -> str:
    t = report.get("timings_s", {})
    rows = [("first call (compile + capture)", "first_call"), ("steady state (median)", "steady"),
            ("swap_lora A -> B", "swap"), ("next image after the swap", "next_after_swap"),
            ("second image after the swap", "second_after_swap"), (f"set_lora_scale({SCALE})", "set_scale"),
            ("next image after the weight change", "next_after_scale"),
            ("fresh accelerate with B: first call", "fresh_first_call")]
    lines = [f"# LoRA swap on an accelerated pipeline ({report['setup']})", "", "| what | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {t[key]:.3f} |" for name, key in rows if key in t]
    lines += ["", "| check | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in report.get("checks", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--smoke", action="store_true", help="embedded model, 32 px, CPU, dynamo's eager backend")
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--budget", type=float, default=200, help="seconds; the fresh-accelerate check needs what is left")
    args = parser.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    from apps.bench_archs import build_pipeline

    if args.smoke:
        device, dtype, size, arch, steps = "cpu", torch.float32, 32, "embedded", {"num_inference_steps": 2}
        compile_ = torch.compile  # dynamo still traces and counts graphs; no inductor C++ build on the CPU
        torch.compile = lambda *a, **k: compile_(*a, **{**k, "backend": "eager"})
    else:
        from apps.bench_archs import DEFAULT_SIZE

        device, dtype, arch, steps = "cuda", torch.float16, args.arch, {}  # the preset's 20 steps
        size = DEFAULT_SIZE[arch]
    pipe = build_pipeline(arch, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    lora_a, lora_b = ({k: v.to(device, dtype) for k, v in random_lora(pipe.unet, rank, seed, std=LORA_STD).items()}
                      for rank, seed in ((RANK_A, 1), (RANK_B, 2)))
    pipe.load_lora_weights(lora_a, adapter_name="style")
    preset = accel.get_preset("balanced", pipe)
    config = preset.replace(runtime=replace(preset.runtime, lora_hotswap=True, lora_max_rank=RANK_B))
    report = {"setup": f"{arch}, {str(dtype).removeprefix('torch.')}, {size} px, {device}, preset balanced + lora_hotswap",
              "config": repr(config), "lora_ranks": [RANK_A, RANK_B], "timings_s": {}, "checks": {}}
    timings, checks = report["timings_s"], report["checks"]

    def write():
        (args.out / "lora_swap.json").write_text(json.dumps(report, indent=1))
        (args.out / "lora_swap.md").write_text(markdown(report))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def call():
        began = time.perf_counter()
        images = pipe(PROMPT, height=size, width=size, generator=torch.Generator("cpu").manual_seed(0),
                      output_type="np", **steps).images
        return images, time.perf_counter() - began

    accel.accelerate(pipe, config)
    out_a, timings["first_call"] = call()
    timings["steady"] = statistics.median(call()[1] for _ in range(1 if args.smoke else 3))
    graphs, captured = _unique_graphs(), _graphs(pipe)
    checks.update(dynamo_graphs_before_swap=graphs, cuda_graphs_before_swap=captured)
    write()

    began = time.perf_counter()
    accel.swap_lora(pipe, lora_b)
    sync()
    timings["swap"] = time.perf_counter() - began
    out_b, timings["next_after_swap"] = call()
    timings["second_after_swap"] = call()[1]
    began = time.perf_counter()
    accel.set_lora_scale(pipe, SCALE)
    sync()
    timings["set_scale"] = time.perf_counter() - began
    out_b_scaled, timings["next_after_scale"] = call()
    checks.update(recompilations=_unique_graphs() - graphs, new_cuda_graphs=_graphs(pipe) - captured,
                  psnr_lora_a_vs_b_db=_psnr(out_a, out_b))  # how far apart the two LoRAs' images are
    write()

    # The reference: the same pipeline restored, B loaded plainly, the preset's sampler, eager.
    accel.restore(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_b, adapter_name="style")
    accel.accelerate(pipe, accel.AccelConfig(sampler=config.sampler))
    reference_b = call()[0]
    pipe.set_adapters(["style"], [SCALE])
    checks.update(psnr_vs_eager_b_db=_psnr(out_b, reference_b), psnr_vs_eager_b_scaled_db=_psnr(out_b_scaled, call()[0]))
    pipe.set_adapters(["style"], [1.0])
    accel.restore(pipe)
    write()

    left = args.budget - (time.perf_counter() - start)
    if args.smoke or left > 1.2 * timings["first_call"] + 10:  # a fresh compile costs about the first call again
        accel.accelerate(pipe, preset)  # the preset as it is, B loaded before: what a user without hotswap runs
        fresh_b, timings["fresh_first_call"] = call()
        checks["psnr_vs_fresh_accelerate_b_db"] = _psnr(out_b, fresh_b)
        accel.restore(pipe)
    else:
        checks["psnr_vs_fresh_accelerate_b_db"] = f"skipped: {left:.0f} s left of the budget"
    checks["total_s"] = round(time.perf_counter() - start, 1)
    write()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
