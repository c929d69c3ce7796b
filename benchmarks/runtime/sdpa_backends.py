"""SDPA kernels at the attention shapes of the models we run, and whether a pinned kernel survives torch.compile.

    source benchmarks/device_setup.sh && python3 benchmarks/runtime/sdpa_backends.py --out $OUT/sdpa    # GPU
    python3 benchmarks/runtime/sdpa_backends.py --smoke --out /tmp/sdpa                              # CPU

1. PyTorch's own pick (default) and each of its SDPA kernels (flash, efficient, cudnn) at one attention call of FLUX.1-dev (1024 px: 4,608
   tokens, 24 heads of 128), SD3-medium (CFG batch 2, 4,429 tokens, 24 heads of 64), SDXL's and SD1.5's largest
   self-attention: median of 20 CUDA-event-timed calls after 3 warm-up calls, TFLOP/s, largest difference to the
   math kernel in float32.
2. The kernel a compiled function runs (profiler's CUDA kernel names) when it is called under
   `sdpa_kernel(backend)`: compiled fresh under cudnn; then, after `torch._dynamo.reset()`, compiled under flash
   while inductor's on-disk cache already holds the cudnn graph, and the other way round. A graph taken from the cache
   compiled under another kernel shows that the pin is not part of the cache key.

Writes sdpa_backends.json to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, heads, query tokens, key tokens, head dim)
SHAPES = {
    "flux-dev 1024 px": (1, 24, 4608, 4608, 128),
    "sd3-medium 1024 px, CFG": (2, 24, 4429, 4429, 64),
    "sdxl 1024 px, CFG, first self-attention": (2, 10, 4096, 4096, 64),
    "sd15 512 px, CFG, first self-attention": (2, 8, 4096, 4096, 40),
}
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def _time(fn, device: str, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    if device != "cuda":
        import time

        times = []
        for _ in range(calls):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return statistics.median(times)
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def kernels(device: str, dtype, smoke: bool) -> list[dict]:
    rows = []
    for name, (b, h, n, m, d) in SHAPES.items():
        if smoke:
            n = m = 64
        gen = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, generator=gen) for t in (n, m, m))
        with sdpa_kernel(SDPBackend.MATH):
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flop = 4 * b * h * n * m * d
        for backend, kind in BACKENDS.items():
            row = {"shape": name, "dims": [b, h, n, m, d], "backend": backend}
            try:
                with sdpa_kernel(kind) if kind is not None else contextlib.nullcontext():  # default: PyTorch's pick
                    out = F.scaled_dot_product_attention(q, k, v)
                    seconds = _time(lambda: F.scaled_dot_product_attention(q, k, v), device)
                    if device == "cuda":
                        row["kernels"] = _kernel_names(lambda: F.scaled_dot_product_attention(q, k, v))
                row.update(ms=seconds * 1e3, tflops=flop / seconds / 1e12,
                           max_abs_diff_to_math_fp32=float((out.float() - reference).abs().max()))
            except RuntimeError as error:  # the kernel does not take this shape / dtype / device
                row["error"] = str(error).splitlines()[0][:200]
            rows.append(row)
            print(row, flush=True)
    return rows


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()
                   or "flash" in e.key.lower() or "cudnn" in e.key.lower() or "sdpa" in e.key.lower()})[:8]


def pin_under_compile(device: str, dtype) -> list[dict]:
    """Which kernel a compiled SDPA runs under each pin, fresh and from inductor's warm cache."""
    b, h, n, m, d = SHAPES["sd3-medium 1024 px, CFG"]
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype) for t in (n, m, m))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v) * 1.0

    rows = []
    for label, backend in (("cudnn, compiled fresh", "cudnn"), ("flash, after reset (cache warm with cudnn)", "flash"),
                           ("cudnn, after reset (cache warm with both)", "cudnn")):
        torch._dynamo.reset()
        compiled = torch.compile(attention)
        with sdpa_kernel(BACKENDS[backend]):
            compiled(q, k, v)
            names = _kernel_names(lambda: compiled(q, k, v))
        rows.append({"case": label, "pinned": backend, "kernels": names})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--smoke", action="store_true", help="CPU, 64 tokens, float32, no compile check")
    parser.add_argument("--no-compile-check", action="store_true", help="the kernel timings alone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(dtype), "kernels": kernels(device, dtype, args.smoke)}
    if device == "cuda" and not args.no_compile_check:
        report["pin_under_compile"] = pin_under_compile(device, dtype)
    (args.out / "sdpa_backends.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
