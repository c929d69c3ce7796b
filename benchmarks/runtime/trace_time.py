"""How long dynamo's bytecode tracing of a UNet takes (issue 23): the part of a compile that torch's portable
artifacts do not hold, so a fresh process loading them still pays it.

    python3 benchmarks/runtime/trace_time.py --arch sdxl          # CPU is enough: tracing is Python work

The UNet of `--arch` (random weights, bf16, a 16x16 latent: tracing does not depend on the size), compiled into
dynamo's "eager" backend (no inductor), first call timed and dynamo's own compile metrics printed. `--accelerated`
traces it under the `balanced` preset's hooks (no compile, no CUDA graphs) to see what they add.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
from aot_compile import unet_call  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--accelerated", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from torch._dynamo.utils import compile_times

    import accel
    from apps.bench_archs import build_pipeline

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    pipe = build_pipeline(args.arch, device="cpu", dtype=dtype)
    unet = pipe.unet
    call_args, call_kwargs = unet_call(unet, 16, "cpu", dtype)
    if args.accelerated:
        config = accel.resolve_config(preset="balanced", pipe=pipe)
        accel.accelerate(pipe, config.replace(runtime=replace(config.runtime.without_compile(cuda_graph=False),
                                                              components=("denoiser",))))
    forward = torch.compile(unet.forward, backend="eager")
    with torch.no_grad():
        start = time.perf_counter()
        forward(*call_args, **call_kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        forward(*call_args, **call_kwargs)
        second = time.perf_counter() - start
    print(f"{args.arch} UNet{' (accelerated)' if args.accelerated else ''}: first call (trace) {first:.1f} s, "
          f"second {second:.2f} s")
    print(compile_times(repr="str"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
