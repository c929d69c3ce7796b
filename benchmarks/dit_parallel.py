"""DiTs on 2 GPUs: context parallelism (diffusers' Ulysses, driven by `ContextParallelConfig`) on Flux, CFG
parallelism (`PatchParallelConfig(mode="cfg")`) on SD3, each alone and with the DiT runtime (CFG: its CUDA graphs
without the compile, which CFG parallelism refuses), against one GPU in the same torchrun job (issue 21's parallel part; its 2-GPU measurement was left to a multi-GPU machine).

    torchrun --nproc-per-node 2 benchmarks/dit_parallel.py --out DIR            # bash benchmarks/run_dit_parallel.sh
    torchrun --nproc-per-node 2 benchmarks/dit_parallel.py --out DIR --smoke    # tiny Flux / SD3, CPU, gloo

FLUX.1-dev and SD3-medium architectures as `flux_runtime.py` builds them (random weights, bf16, 1024 px, 28 steps,
prompt embeddings in, latents out). Every rank runs every contender (the one-GPU ones too, each on its own GPU:
the same work twice, so rank 0's time is one GPU's); rank 0 times the calls (median of --runs after one warm-up)
and writes `dit_parallel.{json,md}`. PSNR of the final latents to stock's, the peak being stock's range: the
parallel contenders must match one GPU within bf16 rounding. Contenders that fail are recorded with their error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import accel  # noqa: E402
from accel import AccelConfig  # noqa: E402
from accel.parallel import ContextParallelConfig, PatchParallelConfig, init_distributed  # noqa: E402
from flux_runtime import ARCHS, RUNTIME, latent_psnr  # noqa: E402
from dit_cache import _call  # noqa: E402

# (arch, contender, config): None is stock. The runtime is the flow presets' (regional compile, CUDA graphs).
CONTENDERS = [
    ("flux-dev", "stock", None),
    ("flux-dev", "runtime", AccelConfig(runtime=RUNTIME)),
    ("flux-dev", "ulysses", AccelConfig(parallel=ContextParallelConfig())),
    ("flux-dev", "ulysses + runtime", AccelConfig(parallel=ContextParallelConfig(), runtime=RUNTIME)),
    ("sd3-medium", "stock", None),
    ("sd3-medium", "runtime", AccelConfig(runtime=RUNTIME)),
    ("sd3-medium", "cfg", AccelConfig(parallel=PatchParallelConfig(mode="cfg"))),
    # CFG parallelism refuses a compiled denoiser (its exchange would sit in the compiled code): graphs only.
    ("sd3-medium", "cfg + graphs", AccelConfig(parallel=PatchParallelConfig(mode="cfg"),
                                               runtime=replace(RUNTIME, compile=None))),
]


def measure(pipe, args: dict, steps: int, config, runs: int) -> dict:
    if config is not None:
        accel.accelerate(pipe, config)
    try:
        dist.barrier()
        _, warmup = _call(pipe, args, steps)
        times = []
        for _ in range(runs):
            dist.barrier()
            latents, seconds = _call(pipe, args, steps)
            times.append(seconds)
    finally:
        if config is not None:
            accel.restore(pipe)
    call = statistics.median(times)
    return {"warmup_call_s": round(warmup, 2), "times_s": [round(t, 4) for t in times],
            "ms_per_step": round(1e3 * call / steps, 2), "latents": latents.float().cpu()}


COLUMNS = [("arch", "arch"), ("contender", "contender"), ("ms / step", "ms_per_step"),
           ("speed-up over stock (one GPU)", "speedup"), ("over the runtime (one GPU)", "over_runtime"),
           ("warm-up call s", "warmup_call_s"), ("PSNR to stock (dB)", "psnr_to_stock_db"), ("note", "error")]


def markdown(report: dict) -> str:
    head = [title for title, _ in COLUMNS]
    lines = [f"# DiTs on {report['world']} processes ({report['device']}, torch {report['torch']})", "",
             f"`{report['command']}`", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(r.get(key, "" if key == "error" else "-")) for _, key in COLUMNS) + " |"
              for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny Flux / SD3 on the CPU (gloo), 4 steps")
    parser.add_argument("--archs", default="flux-dev,sd3-medium")
    args = parser.parse_args()
    rank, world, device = init_distributed("cpu" if args.smoke else "auto")
    if world < 2:
        raise SystemExit("error: run under a launcher with 2+ processes (torchrun --nproc-per-node 2 ...); "
                         f"WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')}")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    steps, runs = (4, 1) if args.smoke else (28, args.runs)
    report = {"world": world, "device": "cpu (gloo)" if args.smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": [],
              "command": f"torchrun --nproc-per-node {world} benchmarks/dit_parallel.py" + (" --smoke" if args.smoke else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for arch_name in args.archs.split(","):
        arch = ARCHS[arch_name]
        pipe, call_args = arch.build(args.smoke, device, dtype)
        rows, stock = {}, None
        for name, contender, config in CONTENDERS:
            if name != arch_name:
                continue
            row = {"arch": name, "contender": contender, "accel_config": repr(config) if config else None}
            try:
                result = measure(pipe, call_args, steps, config, runs)
                latents = result.pop("latents")
                row.update(result)
                if stock is None:
                    stock = (latents, row["ms_per_step"])
                else:
                    row["psnr_to_stock_db"] = latent_psnr(latents, stock[0])
                    row["speedup"] = round(stock[1] / row["ms_per_step"], 2)
                if "runtime" in rows and "ms_per_step" in rows["runtime"] and contender != "runtime":
                    row["over_runtime"] = round(rows["runtime"]["ms_per_step"] / row["ms_per_step"], 2)
            except Exception as err:  # one failing contender must not lose the others
                if rank == 0:
                    traceback.print_exc()
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            rows[contender] = row
            report["rows"].append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
                (args.out / "dit_parallel.json").write_text(json.dumps(report, indent=1))
                (args.out / "dit_parallel.md").write_text(markdown(report))
            torch._dynamo.reset()
        del pipe
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if rank == 0:
        print(f"[dit_parallel] {time.perf_counter() - start:.0f} s")
        print(markdown(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
