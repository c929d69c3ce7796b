"""How far the DiT runtimes' measured steps are from the GPU's arithmetic rate (issue 21's runtime-alone targets).

Counts the floating-point operations of one transformer call with torch's `FlopCounterMode`, on the meta device (no
weights, no GPU: the architectures of `flux_runtime.py`, at its resolution and batch), and sets them against the
steps recorded in `benchmarks/results/flux-runtime/` (stock and the runtime alone, each table one H200 run): the rate
each sustains over the whole step, and the rate a target speed-up over stock would need. The H200's dense bf16 peak
is NVIDIA's 989 TFLOP/s (1,979 with 2:4 sparsity, which no contender uses).

    python3 benchmarks/runtime/dit_flops.py --out benchmarks/results/flux-runtime   (CPU, about a minute)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # flux_runtime.py, dit_cache.py
RESULTS = HERE.parent / "results" / "flux-runtime"
H200_BF16_DENSE_TFLOPS = 989.0
# arch: (results table, issue 21's runtime-alone target over stock)
TABLES = {"flux-dev": ("flux_runtime.json", 1.5), "sd3-medium": ("sd3.json", 2.0), "sana-1600m": ("sana_runtime.json", None)}


def transformer_call(arch: str):
    """(transformer on the meta device, its call's keyword arguments): one denoising step at 1024 px."""
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel
    from dit_cache import FLUX_DEV
    from flux_runtime import SANA_1600M, SD3_MEDIUM

    dtype = torch.bfloat16

    def t(*shape):
        return torch.zeros(*shape, dtype=dtype)

    with torch.device("meta"):
        if arch == "flux-dev":  # batch 1: guidance is an embedding, not a second branch; 512 T5 tokens
            model = FluxTransformer2DModel(**FLUX_DEV).to(dtype)
            kwargs = dict(hidden_states=t(1, 4096, 64), encoder_hidden_states=t(1, 512, 4096), pooled_projections=t(1, 768),
                          timestep=t(1), guidance=t(1), img_ids=t(4096, 3), txt_ids=t(512, 3))
        elif arch == "sd3-medium":  # CFG batch 2, 333 text tokens
            model = SD3Transformer2DModel(**SD3_MEDIUM).to(dtype)
            kwargs = dict(hidden_states=t(2, 16, 128, 128), encoder_hidden_states=t(2, 333, 4096),
                          pooled_projections=t(2, 2048), timestep=t(2))
        else:  # Sana: CFG batch 2, 300 Gemma tokens, 32 x 32 latent
            model = SanaTransformer2DModel(**SANA_1600M).to(dtype)
            kwargs = dict(hidden_states=t(2, 32, 32, 32), encoder_hidden_states=t(2, 300, 2304), timestep=t(2),
                          encoder_attention_mask=torch.ones(2, 300, dtype=dtype))
        return model, kwargs


def count(arch: str) -> dict:
    model, kwargs = transformer_call(arch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**kwargs, return_dict=False)
    by_op = {str(op).split(".")[-1]: flops / 1e12 for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"tflop": counter.get_total_flops() / 1e12, "tflop_by_op": by_op,
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for arch, (table, target) in TABLES.items():
        row = {"arch": arch, **count(arch)}
        measured = {r["contender"]: r["ms_per_step"] for r in json.loads((RESULTS / table).read_text())["rows"]
                    if "ms_per_step" in r}
        row["table"] = table
        for name in ("stock", "runtime"):
            row[f"{name}_ms"] = measured[name]
            row[f"{name}_tflops"] = row["tflop"] / measured[name] * 1e3
        if target is not None:
            row["target"] = target
            row["target_ms"] = measured["stock"] / target
            row["target_tflops"] = row["tflop"] / row["target_ms"] * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flops.json").write_text(json.dumps({"peak_tflops": H200_BF16_DENSE_TFLOPS, "rows": rows}, indent=1))
    peak = H200_BF16_DENSE_TFLOPS
    lines = ["One transformer call (one step) at 1024 px, counted by `FlopCounterMode` on the meta device; measured steps "
             f"from this folder's tables (H200, bf16); rates as a share of the H200's dense bf16 peak ({peak:.0f} TFLOP/s).",
             "", "| arch | TFLOP / step (matmul, attention) | stock ms / step | stock rate | runtime ms / step | runtime rate "
             "| target | needed ms / step | needed rate |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        attention = r["tflop_by_op"].get("bmm", 0.0)
        need = (f"{r['target']}x | {r['target_ms']:.1f} | {r['target_tflops']:.0f} TFLOP/s "
                f"({100 * r['target_tflops'] / peak:.0f}%)") if "target" in r else "- | - | -"
        lines.append(f"| {r['arch']} | {r['tflop']:.2f} ({r['tflop'] - attention:.2f}, {attention:.2f}) | {r['stock_ms']:.1f} | "
                     f"{r['stock_tflops']:.0f} TFLOP/s ({100 * r['stock_tflops'] / peak:.0f}%) | {r['runtime_ms']:.1f} | "
                     f"{r['runtime_tflops']:.0f} TFLOP/s ({100 * r['runtime_tflops'] / peak:.0f}%) | {need} |")
    (args.out / "flops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
