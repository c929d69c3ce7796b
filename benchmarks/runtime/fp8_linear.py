"""Where FP8 loses on UNets (issue 22): one linear layer at a time, 16 bit against the runtime's FP8 layer, split.

`RuntimeConfig(quantize="fp8")` made the SD1.5 UNet step 11% slower and SDXL's 5% slower on the H200, while Flux
gained 1.32x (benchmarks/results/quantize/). This times, at the layer shapes of those models (rows = tokens of the
CFG batch), each piece of the FP8 layer under torch.compile, replayed from a CUDA graph (launch overhead out):
- `16-bit`: `F.linear` in the model's dtype;
- `fp8 layer`: `accel.runtime.quantize.QuantizedLinear` as the runtime runs it (per-row quantize of the input, then
  `torch._scaled_mm` with row-wise scales and the output cast);
- `fp8 matmul`: `torch._scaled_mm` alone on an input quantized beforehand (the kernel's own speed);
- `quantize`: the per-row quantize of the input alone.
So `fp8 layer` against `16-bit` is what the runtime gets, `fp8 matmul` what it could get if the quantize were free
(fused into the layer before), and `quantize` what that pass costs.

    python3 benchmarks/runtime/fp8_linear.py --out DIR [--smoke]
--smoke: CPU, small shapes, the reference FP8 kernel (ACCEL_QUANTIZE_CPU=1), eager: a check that it runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from accel.runtime.quantize import CPU_SWITCH, FORMATS, QuantizedLinear, _output_dtype, quantize_rows
from sdpa_backends import _time

# (model, layer, rows, in, out): rows are the tokens of one denoiser call at CFG batch 2 (Flux: batch 1, no CFG).
SHAPES = [
    ("sd15 512", "attention q/k/v/out, 64x64", 8192, 320, 320),
    ("sd15 512", "feed-forward in (GEGLU), 64x64", 8192, 320, 2560),
    ("sd15 512", "feed-forward out, 64x64", 8192, 1280, 320),
    ("sd15 512", "feed-forward in, 32x32", 2048, 640, 5120),
    ("sd15 512", "feed-forward in, 16x16", 512, 1280, 10240),
    ("sdxl 1024", "attention q/k/v/out, 64x64", 8192, 640, 640),
    ("sdxl 1024", "feed-forward in (GEGLU), 64x64", 8192, 640, 5120),
    ("sdxl 1024", "feed-forward out, 64x64", 8192, 2560, 640),
    ("sdxl 1024", "feed-forward in, 32x32", 2048, 1280, 10240),
    ("sdxl 1024", "feed-forward out, 32x32", 2048, 5120, 1280),
    ("flux 1024", "fused q/k/v", 4608, 3072, 9216),
    ("flux 1024", "feed-forward in", 4608, 3072, 12288),
    ("flux 1024", "feed-forward out", 4608, 12288, 3072),
]
SMOKE_SHAPES = [("smoke", "tiny", 64, 32, 48)]


def timed(fn, x, repeats: int, device: str) -> float:
    """Median microseconds per call of `fn(x)` (`sdpa_backends._time`'s medians): on a GPU, `repeats` calls captured
    in one CUDA graph and replayed (launch overhead out), after the compile and autotuning calls; on the CPU eager."""
    if device != "cuda":
        return 1e6 * _time(lambda: fn(x), device, calls=5)
    for _ in range(3):  # compile, autotune, warm
        fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn(x)
    return 1e6 * _time(graph.replay, device, calls=10) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        os.environ.setdefault(CPU_SWITCH, "1")
    fmt = FORMATS["fp8"]
    compile_ = (lambda f: f) if args.smoke else torch.compile
    rows = []
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "command": "python3 benchmarks/runtime/fp8_linear.py" + (" --smoke" if args.smoke else ""), "rows": rows}
    for model, layer, m, k, n in SMOKE_SHAPES if args.smoke else SHAPES:
        dtype = torch.float32 if args.smoke else (torch.bfloat16 if model.startswith("flux") else torch.float16)
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
        x = torch.randn(m, k, device=device, dtype=dtype)
        quantized = QuantizedLinear(linear, fmt, _output_dtype(fmt, torch.device(device), dtype)).to(device)
        x_q, x_scale = quantize_rows(x, fmt)

        def matmul_only(_):
            return fmt.matmul(x_q, x_scale, quantized.qweight, quantized.weight_scale, quantized.bias,
                              quantized.out_dtype)

        fns = {"16-bit": compile_(linear.forward), "fp8 layer": compile_(quantized.forward),
               "fp8 matmul": compile_(matmul_only), "quantize": compile_(lambda t: quantize_rows(t, fmt))}
        row = {"model": model, "layer": layer, "rows": m, "in": k, "out": n, "dtype": str(dtype).replace("torch.", "")}
        with torch.no_grad():
            for name, fn in fns.items():
                try:
                    row[f"{name} us"] = round(timed(fn, x, args.repeats, device), 2)
                except Exception as err:  # one failing piece must not lose the others
                    row[f"{name} us"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            error = (quantized(x).float() - linear(x).float()).abs().max().item()
        flop = 2 * m * k * n
        for name in ("16-bit", "fp8 layer", "fp8 matmul"):
            if isinstance(row[f"{name} us"], float):
                row[f"{name} TFLOP/s"] = round(flop / row[f"{name} us"] / 1e6, 1)
        if all(isinstance(row[f"{name} us"], float) for name in ("16-bit", "fp8 layer")):
            row["fp8 layer speed-up"] = round(row["16-bit us"] / row["fp8 layer us"], 2)
        row["max abs error"] = round(error, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(report, args.out)  # each row as it comes: a timeout keeps the rows so far
        torch._dynamo.reset()
    print((args.out / "fp8_linear.md").read_text())


def write(report: dict, out: Path) -> None:
    (out / "fp8_linear.json").write_text(json.dumps(report, indent=1))
    head = ["model", "layer", "rows", "in", "out", "16-bit us", "fp8 layer us", "fp8 matmul us", "quantize us",
            "fp8 layer speed-up", "16-bit TFLOP/s", "fp8 matmul TFLOP/s"]
    lines = [f"# One linear layer, 16 bit against FP8 ({report['device']}, torch {report['torch']})", "",
             f"`{report['command']}`", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(r.get(h, "-")) for h in head) + " |" for r in report["rows"]]
    (out / "fp8_linear.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
