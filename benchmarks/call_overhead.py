"""Per-call host overhead of the session and the caches' hooks (issue 18), on a small, launch-bound UNet.

The embedded model's UNet (12.9 M parameters, 16x16 latents, CFG batch 2) runs in a few milliseconds on a
GPU, most of it kernel launches, so what accel adds per UNet call shows directly. Each config is timed end
to end over whole pipeline calls (DDIM, `--steps` steps) against stock diffusers in the same process, round
by round (each round applies every config in turn, calls it once untimed and once timed, and removes it), so
that a host whose speed drifts slows every config alike; the overhead is the median over rounds of the
difference to that round's stock call, per UNet call.
`session` is `accelerate` with nothing in it, `*-i1` / `*-k1` / `block-t0` run every hook but never reuse a
feature (the pure overhead), the others are the caches at their defaults, and `deepcache-pkg*` the DeepCache
package's helper where it is installed. Run it once per code version (`--label before` with PYTHONPATH on a
copy of the old packages) in the same device call to compare versions.

    python3 benchmarks/call_overhead.py --device cuda --steps 20 --label after --out out/call-overhead-after.json

Host timings on the device move by tens of percent between calls, so `--count-calls` also counts the Python
function calls per UNet call (cProfile, one timed pipeline call per config): a measure of the host work the
session and hooks add that does not depend on the host's speed (run it on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "accel" / "models" / "mini-sd-cifar10"


def configs() -> dict:
    from accel import AccelConfig, BlockCacheConfig, DeepCacheConfig, EncoderPropagationConfig

    table = {
        "stock": None,
        "session": AccelConfig(),
        "deepcache-i1": AccelConfig(cache=DeepCacheConfig(cache_interval=1)),
        "deepcache-i3": AccelConfig(cache=DeepCacheConfig(cache_interval=3)),
        "encprop-k1": AccelConfig(cache=EncoderPropagationConfig(key_interval=1)),
        "encprop": AccelConfig(cache=EncoderPropagationConfig()),
        "block-t0": AccelConfig(cache=BlockCacheConfig(threshold=0.0)),
        "block": AccelConfig(cache=BlockCacheConfig(threshold=0.1)),
    }
    try:
        import DeepCache  # noqa: F401

        table["deepcache-pkg-i1"] = ("pkg", 1)
        table["deepcache-pkg-i3"] = ("pkg", 3)
    except ImportError:
        pass
    return table


def enable(pipe, config):
    """Apply one config; returns the function that undoes it."""
    import accel

    if config is None:
        return lambda: None
    if isinstance(config, tuple):  # the DeepCache package's helper
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=config[1], cache_branch_id=0)
        helper.enable()
        return helper.disable
    accel.accelerate(pipe, config)
    return lambda: accel.restore(pipe)


def call(pipe, steps: int, device: str) -> float:
    """Seconds for one pipeline call, synchronised."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe("a photo of a horse", num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
         generator=torch.Generator("cpu").manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def count_calls(pipe, steps: int, device: str) -> float:
    """Python function calls per UNet call over one pipeline call (after a first, untimed one)."""
    import cProfile
    import pstats

    call(pipe, steps, device)
    profile = cProfile.Profile()
    profile.enable()
    call(pipe, steps, device)
    profile.disable()
    return pstats.Stats(profile).total_calls / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configs")
    parser.add_argument("--label", default="after")
    parser.add_argument("--count-calls", action="store_true", help="also count Python calls per UNet call")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import accel
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, dtype=dtype, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    table = configs()
    names = args.configs.split(",") if args.configs else list(table)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            undo = enable(pipe, table[name])
            try:
                call(pipe, args.steps, args.device)  # a first call per application: buffers, caches
                times[name].append(call(pipe, args.steps, args.device))
            finally:
                undo()
    calls = {}
    if args.count_calls:
        for name in names:
            undo = enable(pipe, table[name])
            try:
                calls[name] = count_calls(pipe, args.steps, args.device)
            finally:
                undo()
    results = {}
    for name, values in times.items():
        row = {"median_ms": 1e3 * statistics.median(values), "times_ms": [1e3 * t for t in values]}
        row["per_unet_call_ms"] = row["median_ms"] / args.steps
        if "stock" in times:
            differences = [(t - s) / args.steps for t, s in zip(values, times["stock"])]
            row["overhead_per_call_ms"] = 1e3 * statistics.median(differences)
            row["speedup"] = statistics.median(s / t for t, s in zip(values, times["stock"]))
        if name in calls:
            row["python_calls_per_unet_call"] = calls[name]
            row["extra_calls_per_unet_call"] = calls[name] - calls.get("stock", calls[name])
        results[name] = row
    meta = {"label": args.label, "accel": str(Path(accel.__file__).parent), "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__,
            "steps": args.steps, "rounds": args.rounds, "scheduler": "DDIM", "batch": "CFG 2, 32x32 px (16x16 latents)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"{args.label}: {meta['accel']} on {meta['gpu'] or args.device}, DDIM {args.steps} steps")
    for name, row in results.items():
        extra = "" if "speedup" not in row else f"  {row['overhead_per_call_ms']:+7.3f} ms/call, {row['speedup']:.2f}x vs stock"
        if "python_calls_per_unet_call" in row:
            extra += f", {row['python_calls_per_unet_call']:.0f} Python calls/UNet call ({row['extra_calls_per_unet_call']:+.0f})"
        print(f"  {name:18s} {row['median_ms']:9.1f} ms/image  {row['per_unet_call_ms']:7.3f} ms/UNet call{extra}")


if __name__ == "__main__":
    main()
