"""Batch generation throughput (issue 10): `accel batch` with a preset against a plain loop over
the stock diffusers pipeline at batch 1, in one run on one machine.

The architecture (random weights; speed does not depend on weight values) is saved once with
`save_pretrained`, so the stock loop and `accel batch` load the very same folder. The stock loop
times one image at a time after one warm-up image. `accel batch` runs as its own process(es)
(`python -m apps.cli batch` for one GPU, `torchrun --nproc-per-node N` for N), and is reported
two ways: overall (wall time of the whole command, loading and compilation included) and steady
state (from the manifest's per-item timestamps: each rank's images after its first batch over the
time they took, summed over ranks).

    python benchmarks/batch_throughput.py --nprocs 1 --n 192 --batch-size 8 --preset balanced --out $OUT/batch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


def stock_loop(folder: Path, prompts: list[str], steps: int, guidance: float, device: str, dtype) -> dict:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def one(i: int):
        generator = torch.Generator("cpu").manual_seed(i)
        pipe(prompts[i], num_inference_steps=steps, guidance_scale=guidance, generator=generator)

    one(0)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(len(prompts)):
        one(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"config": "stock loop, batch 1", "images": len(prompts), "seconds": seconds,
            "images_per_s": len(prompts) / seconds}


def steady_state(manifest: Path) -> dict:
    """Images per second after each rank's first batch, from the manifest's timestamps."""
    by_rank = defaultdict(list)
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        if record["status"] == "ok":
            by_rank[record["rank"]].append(record)
    rates = {}
    for rank, records in sorted(by_rank.items()):
        records.sort(key=lambda r: r["time"])
        first_batch = records[0]["batch_size"]
        t0, t1 = records[first_batch - 1]["time"], records[-1]["time"]
        after = len(records) - first_batch
        rates[rank] = after / (t1 - t0) if t1 > t0 else float("nan")
    return {"per_rank_images_per_s": rates, "images_per_s": sum(rates.values()),
            "images": sum(len(r) for r in by_rank.values())}


def accel_batch(folder: Path, prompts_file: Path, out_dir: Path, nproc: int, args) -> dict:
    common = ["batch", str(prompts_file), "--model", str(folder), "--out", str(out_dir), "--batch-size",
              str(args.batch_size), "--steps", str(args.steps), "--guidance", str(args.guidance), "--no-progress"]
    common += ["--device", "cuda", "--dtype", "float16"] if torch.cuda.is_available() else ["--device", "cpu"]
    if args.preset != "none":
        common += ["--preset", args.preset]
    if nproc == 1:
        command = [sys.executable, "-m", "apps.cli", *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "apps.cli",
                   *common]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = done.stdout + done.stderr
    (out_dir.parent / f"batch-{nproc}.log").write_text(log)
    if done.returncode != 0:
        raise SystemExit(f"accel batch on {nproc} process(es) failed (rc {done.returncode}):\n{log[-3000:]}")
    steady = steady_state(out_dir / "manifest.jsonl")
    return {"config": f"accel batch, {args.preset}, batch {args.batch_size}, {nproc} GPU(s)", "nproc": nproc,
            "images": steady["images"], "wall_s": wall, "overall_images_per_s": steady["images"] / wall,
            "steady_images_per_s": steady["images_per_s"], "per_rank_steady": steady["per_rank_images_per_s"],
            "summary": [line for line in log.splitlines() if line.startswith(("batch:", "  rank"))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--n", type=int, default=192, help="prompts for accel batch (a multiple of batch x procs)")
    parser.add_argument("--n-stock", type=int, default=12, help="images timed in the stock loop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--nprocs", default="1", help="comma-separated process counts, e.g. 1,2")
    parser.add_argument("--out", default="benchmarks/results/batch")
    args = parser.parse_args()
    from apps.bench_archs import build_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    nprocs = [int(n) for n in args.nprocs.split(",")]
    for n in nprocs:
        if args.n % (args.batch_size * n):
            raise SystemExit(f"--n {args.n} must be a multiple of batch size x processes ({args.batch_size} x {n}), "
                             "so that every batch has the compiled shape")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"accel-{args.arch}-random"
    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        build_pipeline(args.arch, device=device, dtype=dtype).save_pretrained(str(folder))
    classes = ("horse", "ship", "cat", "truck", "bird", "dog", "frog", "deer", "airplane", "automobile")
    prompts = [f"a photo of a {classes[i % 10]}, variation {i}" for i in range(args.n)]
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")

    rows = [stock_loop(folder, prompts[: args.n_stock], args.steps, args.guidance, device, dtype)]
    print(f"stock loop: {rows[0]['images_per_s']:.2f} images/s", flush=True)
    for n in nprocs:
        row = accel_batch(folder, prompts_file, out / f"images-{n}", n, args)
        rows.append(row)
        print(f"{row['config']}: steady {row['steady_images_per_s']:.2f} images/s, overall "
              f"{row['overall_images_per_s']:.2f} images/s ({row['wall_s']:.1f} s wall)", flush=True)
    base = rows[0]["images_per_s"]
    one = next((r for r in rows[1:] if r["nproc"] == 1), None)
    lines = [f"{args.arch} architecture (random weights), {args.steps} steps, guidance {args.guidance}, fp16, "
             f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}. Stock: diffusers pipeline as loaded, one "
             "image per call. Steady state excludes each rank's first batch (compilation, graph capture).", "",
             "| config | images | images/s steady | vs stock | vs 1 GPU | images/s overall (wall) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {rows[0]['config']} | {rows[0]['images']} | {base:.2f} | 1.00x | | | {rows[0]['seconds']:.1f} |"]
    for r in rows[1:]:
        vs_one = f"{r['steady_images_per_s'] / one['steady_images_per_s']:.2f}x" if one else ""
        lines.append(f"| {r['config']} | {r['images']} | {r['steady_images_per_s']:.2f} | "
                     f"{r['steady_images_per_s'] / base:.2f}x | {vs_one} | {r['overall_images_per_s']:.2f} | "
                     f"{r['wall_s']:.1f} |")
    command = "python " + " ".join(sys.argv)
    lines += ["", f"Command: `{command}`"]
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    (out / "throughput.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
