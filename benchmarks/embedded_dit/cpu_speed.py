"""CPU generation time of the two embedded models, measured alike in one process, calls interleaved.

    python benchmarks/embedded_dit/cpu_speed.py --runs 10

One pipeline call per run, "a photo of a horse", one 32x32 image with classifier-free guidance (guidance 4):
mini-sd-cifar10 (UNet) at its default DPM-Solver++ 20 steps and mini-sd3-cifar10 (DiT) at its default
FlowMatch Euler 28 steps. The calls alternate, so that load from other processes falls on both alike; the
median and the fastest call of each are printed, and their ratios. On a shared machine ``--threads 1`` is
steadier: with two threads, a thread descheduled by another process stalls every parallel region.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from accel.embedded import load_embedded_pipeline
from accel.embedded_dit import EMBEDDED_DIT_DIR, EMBEDDED_DIT_GUIDANCE, EMBEDDED_DIT_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", default=str(EMBEDDED_DIT_DIR), help="the DiT pipeline folder")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DiffusionPipeline

    tic = time.perf_counter()
    unet_pipe = load_embedded_pipeline("cpu")
    unet_load = time.perf_counter() - tic
    tic = time.perf_counter()
    dit_pipe = DiffusionPipeline.from_pretrained(args.dit, local_files_only=True)
    dit_load = time.perf_counter() - tic
    dit_pipe.set_progress_bar_config(disable=True)
    calls = {
        "mini-sd-cifar10, DPM-Solver++ 20 steps": (unet_pipe, 20, 4.0),
        f"mini-sd3-cifar10, FlowMatch Euler {EMBEDDED_DIT_STEPS} steps": (dit_pipe, EMBEDDED_DIT_STEPS, EMBEDDED_DIT_GUIDANCE),
    }
    seconds = {name: [] for name in calls}
    for run in range(args.runs + 1):
        for name, (pipe, steps, guidance) in calls.items():
            tic = time.perf_counter()
            pipe("a photo of a horse", num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(run))
            if run:  # the first call of each is a warm-up
                seconds[name].append(time.perf_counter() - tic)
    print(f"{torch.get_num_threads()} threads; loading {unet_load:.2f} s (UNet model), {dit_load:.2f} s (DiT)")
    for name, values in seconds.items():
        print(f"{name}: median {statistics.median(values):.3f} s, fastest {min(values):.3f} s over {len(values)} calls")
    (unet, dit) = seconds.values()
    print(f"DiT / UNet: median {statistics.median(dit) / statistics.median(unet):.2f}, fastest {min(dit) / min(unet):.2f}")


if __name__ == "__main__":
    main()
