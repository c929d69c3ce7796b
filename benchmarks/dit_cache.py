"""DiT caches on a Flux-dev-architecture transformer, one process, the same prompt embeddings, seed and steps.

Flux.1-dev's published transformer and scheduler configs with random weights (bf16, 1024 px, 28 steps, guidance
3.5; prompt embeddings passed in, so no text encoder is built, and latents out, so no VAE). Contenders, each
enabled, warmed up, timed and disabled in turn:

- stock; this suite's block cache (`BlockCacheConfig`) at fixed schedules, a full step every 2 or 3 steps, with
  DBCache's first / last blocks and TaylorSeer's first-order forecast, and at DBCache's adaptive default
  (first_blocks=8, threshold 0.08, 8 warm-up steps);
- Cache-DiT (`cache_dit`, skipped with the reason if it does not import): its default, and the same fixed
  schedules through its step mask (`steps_computation_mask`, static policy), with its TaylorSeer calibrator;
- diffusers' own hooks (`transformer.enable_cache`): FirstBlockCache at its default threshold, TaylorSeerCache at
  the same fixed schedules (its default mode forecasts the attention outputs; lite mode skips every block and
  forecasts the output projection);
- stock again, last: its latents must equal the first stock run's, or a contender left something behind.

A fixed schedule gives every contender the same full steps: the warm-up W is chosen so that diffusers'
TaylorSeer rule (full below W and at W + 1 + kN) and ours (full below W and at kN) agree, and the full steps
each contender ran are counted alike, by the calls of a middle block's attention. Random weights time the
network faithfully but make the adaptive contenders' decisions, and every latent's distance to stock, say
nothing about quality: they are reported, not judged.

    python3 benchmarks/dit_cache.py --out DIR [--runs N] [--budget-s S] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import accel
from accel import AccelConfig
from accel.cache import BlockCacheConfig, get_block_cache

# FLUX.1-dev's transformer/config.json and scheduler/scheduler_config.json.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SMOKE = dict(FLUX_DEV, in_channels=16, num_layers=2, num_single_layers=10, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
# The most first / last blocks a contender keeps running: the counted block lies between them.
FIRST, LAST = 8, 2
# Full step every N steps, after a warm-up W with (W + 1) % N == 0 (diffusers' TaylorSeer rule matches ours then).
SCHEDULES = {2: 3, 3: 2, 4: 3}


def full_steps(steps: int, interval: int, warmup: int) -> list[int]:
    """The full steps of `BlockCacheConfig(threshold=None, cache_interval=interval, warmup_steps=warmup)`."""
    return [s for s in range(steps) if s < warmup or s % interval == 0]


@dataclass
class Contender:
    name: str
    family: str
    enable: Callable
    disable: Callable
    schedule: list[int] | None = None  # the full steps of a fixed schedule


def _accel(config: BlockCacheConfig):
    return lambda pipe: accel.accelerate(pipe, AccelConfig(cache=config)), accel.restore


def _diffusers(make_config):
    def enable(pipe):
        pipe.transformer.enable_cache(make_config())

    return enable, lambda pipe: pipe.transformer.disable_cache()


def _cache_dit(make_kwargs):
    """Cache-DiT's `enable_cache(pipe, **make_kwargs(cache_dit))` and `disable_cache(pipe)`."""
    def enable(pipe):
        import cache_dit

        cache_dit.enable_cache(pipe, **make_kwargs(cache_dit))

    def disable(pipe):
        import cache_dit

        cache_dit.disable_cache(pipe)

    return enable, disable


def contenders(steps: int) -> list[Contender]:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    stock = Contender("stock", "stock", lambda pipe: None, lambda pipe: None)
    rows = [stock]
    for interval, warmup in SCHEDULES.items():
        schedule = full_steps(steps, interval, warmup)
        for first, last, order in ((1, 0, None), (1, 0, 1), (FIRST, 0, 1), (FIRST, LAST, 1)):
            config = BlockCacheConfig(threshold=None, cache_interval=interval, warmup_steps=warmup, first_blocks=first,
                                      last_blocks=last, taylor_order=order)
            name = f"accel every {interval} F{first}B{last}" + (f" taylor{order}" if order else "")
            rows.append(Contender(name, "accel", *_accel(config), schedule))
    rows.append(Contender("accel adaptive F8B0 0.08 (DBCache's default)", "accel",
                          *_accel(BlockCacheConfig(threshold=0.08, warmup_steps=8, first_blocks=FIRST))))
    rows.append(Contender("diffusers FirstBlockCache default", "diffusers", *_diffusers(FirstBlockCacheConfig)))
    for interval, warmup in SCHEDULES.items():
        for lite in (False, True):
            def make(interval=interval, warmup=warmup, lite=lite):
                return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=1,
                                             use_lite_mode=lite)

            rows.append(Contender(f"diffusers TaylorSeer every {interval}" + (" lite" if lite else ""), "diffusers",
                                  *_diffusers(make), full_steps(steps, interval, warmup)))
    rows.append(Contender("cache-dit default", "cache-dit", *_cache_dit(lambda cache_dit: {})))
    for interval, warmup in SCHEDULES.items():
        schedule = full_steps(steps, interval, warmup)
        for first, order in ((1, None), (FIRST, 1)):
            def make(cache_dit, first=first, order=order, schedule=schedule, warmup=warmup):
                mask = [int(s in schedule) for s in range(steps)]
                kwargs = {"cache_config": cache_dit.DBCacheConfig(
                    Fn_compute_blocks=first, Bn_compute_blocks=0, max_warmup_steps=warmup, num_inference_steps=steps,
                    steps_computation_mask=mask, steps_computation_policy="static")}
                if order:
                    kwargs["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
                return kwargs

            name = f"cache-dit every {interval} F{first}B0" + (f" taylor{order}" if order else "")
            rows.append(Contender(name, "cache-dit", *_cache_dit(make), schedule))
    rows.append(Contender("stock again", "stock", stock.enable, stock.disable))
    return rows


def build(smoke: bool, device: str, dtype: torch.dtype):
    """The Flux pipeline with random weights and no text encoders or VAE, and its call arguments."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    config = SMOKE if smoke else FLUX_DEV
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config).to(dtype).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device).manual_seed(0)
    tokens, size = (16, 64) if smoke else (512, 1024)
    args = dict(prompt_embeds=torch.randn(1, tokens, config["joint_attention_dim"], generator=g, device=device, dtype=dtype),
                pooled_prompt_embeds=torch.randn(1, config["pooled_projection_dim"], generator=g, device=device, dtype=dtype),
                height=size, width=size, guidance_scale=3.5, output_type="latent")
    return pipe, args


class _Counter:
    """Calls of one module (a middle block's attention projection): the full steps of a pipeline call."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def _call(pipe, args: dict, steps: int) -> tuple[torch.Tensor, float]:
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        latents = pipe(num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0), **args).images
    if device.type == "cuda":
        torch.cuda.synchronize()
    return latents, time.perf_counter() - start


def measure(pipe, args, steps: int, contender: Contender, counter: _Counter, runs: int) -> dict:
    row = {"contender": contender.name, "family": contender.family}
    if contender.schedule is not None:
        row["schedule_full_steps"] = len(contender.schedule)
    contender.enable(pipe)
    try:
        _, first = _call(pipe, args, steps)
        times = []
        for _ in range(runs):
            counter.calls = 0
            latents, seconds = _call(pipe, args, steps)
            times.append(seconds)
        row.update(first_call_s=round(first, 3), times_s=[round(t, 4) for t in times],
                   ms_per_step=round(1e3 * statistics.median(times) / steps, 2), full_steps=counter.calls)
        cache = get_block_cache(pipe)
        if cache is not None:
            row["accel_full_cached_calls"] = list(cache.state.counts())
    finally:
        contender.disable(pipe)
    row["latents"] = latents
    return row


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a - b).norm() / b.norm()), 5)


def markdown(report: dict) -> str:
    lines = [f"DiT caches, {report['setting']}; {report['device']}, torch {report['torch']}, diffusers "
             f"{report['diffusers']}, cache-dit {report['cache_dit']}. Median of {report['runs']} timed calls after one "
             "warm-up; full steps counted by a middle block's attention calls; random weights: the distance to "
             "stock is no quality measure.", "",
             "| contender | ms / step | speed-up | full steps (schedule) | rel. L2 to stock | rel. L2 to accel's same config "
             "| note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        schedule = f" ({r['schedule_full_steps']})" if "schedule_full_steps" in r else ""
        lines.append(f"| {r['contender']} | {r.get('ms_per_step', '-')} | {r.get('speedup', '-')} | "
                     f"{r.get('full_steps', '-')}{schedule} | {r.get('rel_l2_to_stock', '-')} | "
                     f"{r.get('rel_l2_to_accel_same_config', '-')} | {r.get('error', r.get('note', ''))} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2, help="timed calls per contender, after one warm-up call")
    parser.add_argument("--budget-s", type=float, default=330,
                        help="contenders not started by then are skipped (stock again still runs)")
    parser.add_argument("--smoke", action="store_true", help="a tiny Flux on the CPU, 12 steps, one timed call each")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    smoke = args.smoke
    steps, runs = (12, 1) if smoke else (28, args.runs)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    if smoke:
        torch.set_num_threads(1)
    try:
        import cache_dit

        cache_dit_version = cache_dit.__version__
    except Exception as err:  # the Cache-DiT rows then say why they did not run
        cache_dit_version = f"not importable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    import diffusers

    pipe, call_args = build(smoke, device, dtype)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    counter = _Counter(blocks[(FIRST + len(blocks) - LAST - 1) // 2].attn.to_q)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "cache_dit": cache_dit_version, "runs": runs,
              "setting": ("tiny Flux (smoke), 64 px" if smoke else "FLUX.1-dev architecture, random weights, bf16, 1024 px")
              + f", {steps} steps, guidance 3.5, latents out", "rows": []}
    stock, outputs = None, {}
    for contender in contenders(steps):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s and contender.name != "stock again":
            row = {"contender": contender.name, "family": contender.family, "error": f"skipped: {elapsed:.0f} s spent"}
        elif contender.family == "cache-dit" and not cache_dit_version[0].isdigit():
            row = {"contender": contender.name, "family": contender.family, "error": f"cache-dit {cache_dit_version}"}
        else:
            try:
                row = measure(pipe, call_args, steps, contender, counter, runs)
                latents = outputs[contender.name] = row.pop("latents").float()
                if contender.name == "stock":
                    stock = {"ms_per_step": row["ms_per_step"], "latents": latents}
                elif stock is not None:
                    row["speedup"] = round(stock["ms_per_step"] / row["ms_per_step"], 2)
                    row["rel_l2_to_stock"] = _rel_l2(latents, stock["latents"])
                ours = outputs.get(contender.name.replace("cache-dit", "accel"))
                if contender.family == "cache-dit" and ours is not None:  # the same method, two implementations
                    row["rel_l2_to_accel_same_config"] = _rel_l2(latents, ours)
                if contender.name == "stock again" and stock is not None:
                    row["note"] = "identical to stock" if torch.equal(latents, stock["latents"]) else "DIFFERS from stock"
            except Exception as err:  # one failing contender must not lose the others
                row = {"contender": contender.name, "family": contender.family,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "dit_cache.json").write_text(json.dumps(report, indent=1))
        (args.out / "dit_cache.md").write_text(markdown(report))
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"[dit_cache] {time.perf_counter() - start:.0f} s")
    print(markdown(report))


if __name__ == "__main__":
    main()
