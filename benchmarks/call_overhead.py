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

Eager GPU time at SD1.5's size is launch-bound, so `--count-ops` counts what each pipeline step launches instead:
the aten ops dispatched (TorchDispatchMode) and the Python calls made (sys.setprofile), inside the UNet call and
outside it (CFG, scheduler step, the session's step listeners), on a tiny SD1.5-architecture pipeline (SD1.5's
blocks and layers, narrow channels) on the CPU, for full and cached steps of DDIM 50 and DPM-Solver++ 20 and for
the whole call. Ops that wait for the device (`.item()`, `torch.equal`, `bool(tensor)`) are counted as syncs.

    python3 benchmarks/call_overhead.py --device cpu --count-ops --configs stock,deepcache-pkg-i3,deepcache-i3 \
        --out benchmarks/results/call-plan/op-counts-after.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "accel" / "models" / "mini-sd-cifar10"
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH: a copy of the packages as they were (`.before`) comes first


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


# ---------------------------------------------------------------------------------------------
# --count-ops: ops and Python calls per pipeline step (deterministic, CPU).

# aten ops whose result the host reads: on a GPU each one waits for every kernel launched before it.
SYNC_OPS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.item")
SCHEDULES = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def tiny_sd15_pipeline():
    """SD1.5's UNet layout (4 blocks of 2 layers, cross-attention in the first 3, 8 heads) with narrow channels, a
    small CLIP text encoder and VAE: the same modules, so the same ops per call, at a size a CPU runs 50 steps of."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from apps.bench_archs import CLIP_L, SD15_UNET, SD_SCHEDULER

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, sample_size=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                       num_attention_heads=4, projection_dim=32)))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(MODEL / "tokenizer")),
                                   unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepWindows:
    """Counts, per window, what runs inside the UNet call and after it. Window k runs from the start of UNet call k
    to the start of call k + 1 (the pipeline calls the UNet once a step, CFG batched): call k, the CFG combination,
    the scheduler step, the step-end callbacks and the next step's input. Before the first call: `setup`."""

    def __init__(self, unet):
        self.setup: Counter = Counter()
        self.windows: list[dict[str, Counter]] = []
        self.current = self.setup
        # Outside every other hook: the session's call planner and the package's wrapped forward count as the UNet's.
        self.handles = [unet.register_forward_pre_hook(self._start, prepend=True),
                        unet.register_forward_hook(self._end, always_call=True)]

    def _start(self, module, args):
        self.windows.append({"unet": Counter(), "outside": Counter()})
        self.current = self.windows[-1]["unet"]

    def _end(self, module, args, output):
        self.current = self.windows[-1]["outside"]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def count_step_work(pipe, steps: int, what: str) -> tuple[StepWindows, torch.Tensor]:
    """One pipeline call (after an uncounted one) with `what` = "ops" (aten ops by name) or "calls" (Python calls);
    returns the counts and the call's latents."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def run():
        return pipe("a photo of a horse", num_inference_steps=steps, guidance_scale=4.0, height=64, width=64,
                    output_type="latent", generator=torch.Generator("cpu").manual_seed(0)).images

    run()
    windows = StepWindows(pipe.unet)

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            windows.current[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    def count_call(frame, event, arg):
        if event == "call" or event == "c_call":
            windows.current["calls"] += 1

    try:
        if what == "ops":
            with CountOps():
                latents = run()
        else:
            sys.setprofile(count_call)
            try:
                latents = run()
            finally:
                sys.setprofile(None)
    finally:
        windows.remove()
    return windows, latents


def _summary(windows: StepWindows, interval: int) -> dict:
    """Mean per step over the windows that are neither the first (first-call work) nor the last (the loop's end),
    split into full and cached steps (step % interval == 0 is full, as both DeepCaches schedule it)."""
    def total(counter, names=None):
        return sum(v for k, v in counter.items() if names is None or k in names)

    rows = {}
    middle = list(enumerate(windows.windows))[1:-1]
    for kind in ("full", "cached"):
        chosen = [w for k, w in middle if (k % interval == 0) == (kind == "full")]
        if not chosen:
            continue
        unet = Counter()
        outside = Counter()
        for w in chosen:
            unet.update(w["unet"])
            outside.update(w["outside"])
        n = len(chosen)
        rows[kind] = {"steps": n, "unet": total(unet) / n, "outside": total(outside) / n,
                      "syncs": total(unet + outside, SYNC_OPS) / n,
                      "by_op": {k: v / n for k, v in sorted((unet + outside).items())}}
    whole = windows.setup + sum((w["unet"] + w["outside"] for w in windows.windows), Counter())
    rows["call"] = {"total": total(whole), "syncs": total(whole, SYNC_OPS), "setup": total(windows.setup),
                    "by_op": dict(sorted(whole.items()))}
    return rows


def count_ops_main(args, names: list[str]) -> None:
    from diffusers import schedulers

    pipe = tiny_sd15_pipeline()
    table = configs()
    base_config = pipe.scheduler.config
    report, peer = {}, "deepcache-pkg-i3"
    for schedule in args.schedules.split(","):
        latents = {}
        scheduler, steps = schedule.split(":")
        pipe.scheduler = getattr(schedulers, SCHEDULES[scheduler]).from_config(base_config)
        for name in names:
            interval = table[name][1] if isinstance(table[name], tuple) else (
                getattr(getattr(table[name], "cache", None), "cache_interval", 1) if table[name] is not None else 1)
            undo = enable(pipe, table[name])
            try:
                windows, latents[name] = count_step_work(pipe, int(steps), "ops")
                ops = _summary(windows, interval)
                calls = _summary(count_step_work(pipe, int(steps), "calls")[0], interval)
            finally:
                undo()
            report.setdefault(schedule, {})[name] = {"ops": ops, "python_calls": calls}
        for name, row in report[schedule].items():  # the same images as the package's, not only as many ops
            if peer in latents:
                row["max_abs_diff_to_package"] = (latents[name] - latents[peer]).abs().max().item()
    meta = {"label": args.label, "accel": str(Path(accel_path()).parent), "torch": torch.__version__,
            "pipeline": "tiny SD1.5 architecture (block_out_channels 32,32,64,64), CFG batch 2, 64x64 px, latent output"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": report}, indent=1))
    print(f"{args.label}: {meta['accel']}; per step: aten ops in the UNet call + outside it (host syncs), "
          "Python calls in + outside")
    for schedule, rows in report.items():
        print(f"  {schedule}")
        for name, row in rows.items():
            ops, calls = row["ops"], row["python_calls"]
            steps = "  ".join(f"{kind} {ops[kind]['unet']:.0f}+{ops[kind]['outside']:.1f} ops ({ops[kind]['syncs']:.1f} syncs), "
                              f"{calls[kind]['unet']:.0f}+{calls[kind]['outside']:.0f} calls"
                              for kind in ("full", "cached") if kind in ops)
            same = "" if "max_abs_diff_to_package" not in row else f", max |latents - package's| {row['max_abs_diff_to_package']:.3g}"
            print(f"    {name:18s} {steps}  | call: {ops['call']['total']} ops ({ops['call']['syncs']} syncs), "
                  f"{calls['call']['total']} Python calls{same}")


def accel_path() -> str:
    import accel

    return accel.__file__


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configs")
    parser.add_argument("--label", default="after")
    parser.add_argument("--count-calls", action="store_true", help="also count Python calls per UNet call")
    parser.add_argument("--count-ops", action="store_true",
                        help="only count aten ops and Python calls per step on a tiny SD1.5-architecture pipeline (CPU)")
    parser.add_argument("--schedules", default="ddim:50,dpmpp_2m:20", help="with --count-ops: scheduler:steps, ...")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.count_ops:
        count_ops_main(args, args.configs.split(",") if args.configs else ["stock", "deepcache-pkg-i3", "deepcache-i3"])
        return
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
