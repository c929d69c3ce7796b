"""The quality cost of DiT caches on the embedded trained DiT (mini-sd3-cifar10, 5 joint blocks, 32x32 CIFAR-10).

`benchmarks/dit_cache.py` times the same kinds of contender on a random FLUX.1-dev architecture, where quality
says nothing; here a trained model generates n CIFAR-10 prompts (seeds 0..n-1) with FlowMatch Euler at the model
card's defaults (28 steps, guidance 5) under each contender in turn, enabled, run and disabled:

- uncached, the reference for PSNR / SSIM (same prompts and seeds), and again last: its images must equal the
  first run's, or a contender left something behind;
- this suite's block cache (`accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(...)))`, then
  `accel.restore`): fixed schedules (a full step every 2, 3 or 4 steps after a warm-up, `dit_cache.SCHEDULES`),
  plain, with TaylorSeer's first-order forecast, and with DBCache's last block; the adaptive default
  (`BlockCacheConfig()`, threshold 0.1) and DBCache's adaptive default (threshold 0.08, 8 warm-up steps);
- Cache-DiT (skipped with the reason if it does not import): its default `cache_dit.enable_cache(pipe)`, which
  keeps DBCache's 8 first blocks and so cannot apply to 5 blocks (the row says so), the same adaptive cache with
  one first block, and the fixed schedules through its step mask with its TaylorSeer calibrator;
- diffusers' own hooks: `pipe.transformer.enable_cache(...)` is tried first, and in diffusers 0.42
  `SD3Transformer2DModel` has no `CacheMixin` (no `enable_cache`) and its pipeline sets no cache context, so the
  hooks then run with `CacheMixin` mixed into the transformer for the contender and a cache context set around
  each transformer call (one context: SD3 runs both guidance branches as one batch): FirstBlockCache,
  TaylorSeerCache at the same schedules (and lite), MagCache (calibrated on the first batch first, as its config
  asks), Pyramid Attention Broadcast, FasterCache, SeaCache and the lossless TextKVCache; a hook that fails on
  SD3 reports its error.

First and last blocks: with 5 blocks, DBCache's defaults (8 first blocks, Cache-DiT's; 8 + 2 in dit_cache.py)
leave nothing to cache. One first block (Fn=1) is the least that gives the adaptive decision its signal and
caches 4 of 5 blocks on a cached step; one last block (Bn=1) refines the estimate at the price of caching 3 of 5;
Fn=2 or more would leave 3 or fewer blocks to skip for a signal barely steadier.

Per contender: the fraction of the transformer blocks' work that actually ran, counted by forward pre-hooks on
each block's attention query projection and feed-forward output layer (they run only when the block's attention
or feed-forward is computed, whatever a cache does to the block's forward; here the two cost about the same, some
9 d^2 and 8 d^2 multiply-adds a token at width d = 160 over 397 tokens, so the fraction is their mean), and the
effective speed-up, its inverse (the blocks alone: embeddings, final layer, text encoders and VAE are not in it);
wall seconds per image (synchronised; at 32x32 a GPU is launch-bound, so this says little); PSNR and SSIM to the
uncached images; prompt adherence and Frechet distance from the quality harness (`samplers_quality.Judge`); and
which steps each block computed (measured: per block, attention calls per batch).

    python benchmarks/dit_cache_quality.py --device cuda --n 1000 --batch-size 250 --out DIR
    python benchmarks/dit_cache_quality.py --smoke --out /tmp/dit-cache-quality-smoke

`--smoke` runs every contender on the CPU: 8 prompts, 7 steps, 200 real images for the Frechet distance, one
thread (the tiny model is fastest on one), no time budget; its numbers say nothing about the caches.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from accel.cache import BlockCacheConfig
from accel.embedded_dit import EMBEDDED_DIT_GUIDANCE, EMBEDDED_DIT_NAME, EMBEDDED_DIT_STEPS
from accel.quality.cifar import load_cifar10
from accel.quality.classifier import load_classifier
from accel.quality.evaluate import cifar_prompts, classifier_outputs, generate
from accel.quality.metrics import ssim
from dit_cache import SCHEDULES, Contender, _accel, _cache_dit, _Counter, full_steps
from samplers_quality import Judge
from tuned_embedded import load_model

SMOKE = {"n": 8, "steps": 7, "batch_size": 8, "real_images": 200, "threads": 1, "budget_s": math.inf}
UNCACHED, UNCACHED_AGAIN = "uncached", "uncached again"
# (first, last, taylor order) of our fixed-schedule rows; Cache-DiT runs the same, diffusers' TaylorSeer its own.
FIXED = ((1, 0, None), (1, 0, 1), (1, 1, 1))


@dataclass
class Setting(Contender):
    computes: str = ""  # which blocks / steps it computes, in words


def _name(family: str, interval: int, first: int, last: int, order: int | None) -> str:
    return f"{family} every {interval} F{first}B{last}" + (f" taylor{order}" if order else "")


def _fixed_schedule(steps: int, interval: int, warmup: int, first: int, last: int, blocks: int) -> str:
    full = full_steps(steps, interval, warmup)
    cached = f"blocks {first}-{blocks - last - 1}" if blocks - last - 1 > first else f"block {first}"
    always = [f"block{'s' if first > 1 else ''} 0{f'-{first - 1}' if first > 1 else ''}"]
    if last:
        always.append(f"block {blocks - 1}")
    return (f"{' and '.join(always)} every step; {cached} at steps < {warmup} and every {interval} steps "
            f"({len(full)}/{steps} steps)")


class _SD3CacheContext:
    """What diffusers' cache hooks need from SD3, which (0.42) gives neither: `CacheMixin` on the transformer
    (mixed into its class while the hook is on: `enable_cache` / `disable_cache` and the per-call state reset of
    `maybe_free_model_hooks`), and a cache context around each transformer call, as Flux's pipeline sets with
    `cache_context("cond")`: one name, since SD3 runs both guidance branches as one batch, with the step index
    counted from the calls (every pipeline call here runs `steps` of them) and the step's sigma. The latest
    timestep is kept for the hooks that take a `current_timestep_callback`."""

    def __init__(self, pipe, steps: int):
        self.pipe, self.steps, self.calls, self.timestep = pipe, steps, 0, None
        self.handles = []

    def enable(self, config) -> None:
        from diffusers.models.cache_utils import CacheMixin

        transformer = self.pipe.transformer
        if not isinstance(transformer, CacheMixin):
            original = type(transformer)
            transformer.__class__ = type(original.__name__, (original, CacheMixin), {})
            transformer._bench_original_class = original
        try:
            transformer.enable_cache(config)
        except BaseException:
            self._unmix(transformer)
            raise
        self.calls = 0
        self.handles = [transformer.register_forward_pre_hook(self._enter, with_kwargs=True),
                        transformer.register_forward_hook(self._exit)]

    def _enter(self, module, args, kwargs):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        step = self.calls % self.steps
        self.calls += 1
        timestep = kwargs.get("timestep")
        self.timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else timestep
        sigmas = self.pipe.scheduler.sigmas
        _set_cache_context(module, CacheContext("cond", step_index=step, num_inference_steps=self.steps,
                                                timestep=self.timestep, sigma=float(sigmas[step])))

    def _exit(self, module, args, output):
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(module, None)

    def disable(self) -> None:
        transformer = self.pipe.transformer
        for handle in self.handles:
            handle.remove()
        self.handles = []
        try:
            transformer.disable_cache()
        finally:
            self._unmix(transformer)

    @staticmethod
    def _unmix(transformer) -> None:
        original = transformer.__dict__.pop("_bench_original_class", None)
        if original is not None:
            transformer.__class__ = original
            transformer.__dict__.pop("_cache_config", None)


def _diffusers(context: _SD3CacheContext, make_config):
    return lambda pipe: context.enable(make_config()), lambda pipe: context.disable()


def _mag_ratios(pipe, context: _SD3CacheContext, prompts: list[str], steps: int, guidance: float) -> list[float]:
    """MagCache's calibration as its config asks for it: one pipeline call with `calibrate=True`, whose printed
    ratios are read back."""
    from diffusers.hooks import MagCacheConfig

    context.enable(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), torch.no_grad():
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator(pipe._execution_device).manual_seed(0), output_type="latent")
    finally:
        context.disable()
    return ast.literal_eval([line for line in printed.getvalue().splitlines() if line.startswith("[")][-1])


def contenders(pipe, steps: int, guidance: float, calibration_prompts: list[str]) -> list[Setting]:
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, SeaCacheConfig, TaylorSeerCacheConfig,
                                 TextKVCacheConfig)

    blocks = len(pipe.transformer.transformer_blocks)
    uncached = Setting(UNCACHED, "uncached", lambda pipe: None, lambda pipe: None, computes="every block at every step")
    rows = [uncached]

    def add(name, family, enable_disable, computes, schedule=None):
        rows.append(Setting(name, family, *enable_disable, schedule, computes))

    for interval, warmup in SCHEDULES.items():
        for first, last, order in FIXED:
            config = BlockCacheConfig(threshold=None, cache_interval=interval, warmup_steps=warmup, first_blocks=first,
                                      last_blocks=last, taylor_order=order)
            add(_name("accel", interval, first, last, order), "accel", _accel(config),
                _fixed_schedule(steps, interval, warmup, first, last, blocks), full_steps(steps, interval, warmup))
    add("accel adaptive F1B0 0.1 (the default)", "accel", _accel(BlockCacheConfig()),
        "block 0 every step; blocks 1-4 from step 1 where block 0's residual moved >= 0.1")
    add("accel adaptive F1B0 0.08 W8 (DBCache's default, Fn=1)", "accel",
        _accel(BlockCacheConfig(threshold=0.08, warmup_steps=8)),
        "block 0 every step; blocks 1-4 from step 8 where block 0's residual moved >= 0.08")

    # Adaptive with TaylorSeer's forecast and at most 3 cached steps in a row, against MagCache at its speed-up.
    for first, threshold in ((1, 0.15), (1, 0.2), (1, 0.3), (2, 0.2)):
        config = BlockCacheConfig(threshold=threshold, first_blocks=first, max_consecutive_cached=3, taylor_order=1)
        add(f"accel adaptive F{first}B0 {threshold} taylor1 max3", "accel", _accel(config),
            f"block{'s 0-1' if first > 1 else ' 0'} every step; blocks {first}-{blocks - 1} from step 1 where block "
            f"{first - 1}'s residual moved >= {threshold}, at most 3 cached steps in a row; the cached residual forecast")
    add("cache-dit default", "cache-dit", _cache_dit(lambda cache_dit: {}), "DBCache F8B0, threshold 0.08, 8 warm-up steps")
    add("cache-dit adaptive F1B0 0.08 W8", "cache-dit", _cache_dit(lambda cache_dit: {"cache_config": cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0)}), "as accel adaptive F1B0 0.08 W8: its default with Fn=1")
    for interval, warmup in SCHEDULES.items():
        schedule = full_steps(steps, interval, warmup)
        for first, last, order in FIXED:
            def make(cache_dit, first=first, last=last, order=order, schedule=schedule, warmup=warmup):
                mask = [int(s in schedule) for s in range(steps)]
                kwargs = {"cache_config": cache_dit.DBCacheConfig(
                    Fn_compute_blocks=first, Bn_compute_blocks=last, max_warmup_steps=warmup, num_inference_steps=steps,
                    steps_computation_mask=mask, steps_computation_policy="static")}
                if order:
                    kwargs["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
                return kwargs

            add(_name("cache-dit", interval, first, last, order), "cache-dit", _cache_dit(make),
                _fixed_schedule(steps, interval, warmup, first, last, blocks), schedule)

    context = _SD3CacheContext(pipe, steps)

    def plain_enable_cache(pipe):  # what a user tries first
        pipe.transformer.enable_cache(FirstBlockCacheConfig())

    add("diffusers enable_cache on SD3", "diffusers", (plain_enable_cache, lambda pipe: None),
        "FirstBlockCache through SD3Transformer2DModel.enable_cache")
    add("diffusers FirstBlockCache 0.05 (default)", "diffusers", _diffusers(context, FirstBlockCacheConfig),
        "block 0 every step; blocks 1-4 where block 0's residual moved >= 0.05")
    for interval, warmup in SCHEDULES.items():
        for lite in (False, True):
            def make(interval=interval, warmup=warmup, lite=lite):
                return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=1,
                                             use_lite_mode=lite)

            what = "every block's output projection forecast" if lite else "every block's attention and feed-forward forecast"
            add(f"diffusers TaylorSeer every {interval}" + (" lite" if lite else ""), "diffusers",
                _diffusers(context, make), f"{what} on cached steps; full at steps < {warmup + 1} and "
                f"{warmup + 1} + {interval}k", full_steps(steps, interval, warmup))

    def mag_enable(pipe):
        ratios = _mag_ratios(pipe, context, calibration_prompts, steps, guidance)
        context.enable(MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps))

    add("diffusers MagCache 0.06 (calibrated)", "diffusers", (mag_enable, lambda pipe: context.disable()),
        "first 20% of steps full, then blocks skipped while the accumulated magnitude-ratio error stays < 0.06 "
        "(at most 3 in a row); ratios calibrated on one batch")
    add("diffusers PyramidAttentionBroadcast 2", "diffusers", _diffusers(context, lambda: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: context.timestep)),
        "attention reused every 2nd step for timesteps in (100, 800), feed-forward every step")
    add("diffusers FasterCache", "diffusers", _diffusers(context, lambda: FasterCacheConfig(
        current_timestep_callback=lambda: context.timestep, attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=False)), "attention reused every 2nd step for timesteps < 681, its CFG branch reuse")
    add("diffusers SeaCache 0.25 (default)", "diffusers", _diffusers(context, SeaCacheConfig),
        "blocks skipped while the spectral indicator's accumulated change < 0.25")
    add("diffusers TextKVCache (lossless)", "diffusers", _diffusers(context, TextKVCacheConfig),
        "every block at every step; text keys / values computed once")
    add(UNCACHED_AGAIN, "uncached", (uncached.enable, uncached.disable), uncached.computes)
    return rows


class BlockWork:
    """Forward pre-hooks on every block's attention query projection and feed-forward output layer: they run
    only when the block's attention or feed-forward is computed."""

    def __init__(self, transformer):
        blocks = transformer.transformer_blocks
        self.attention = [_Counter(block.attn.to_q) for block in blocks]
        self.feed_forward = [_Counter(block.ff.net[-1]) for block in blocks]

    def reset(self) -> None:
        for counter in (*self.attention, *self.feed_forward):
            counter.calls = 0

    def calls(self) -> dict:
        return {"attention": [c.calls for c in self.attention], "feed_forward": [c.calls for c in self.feed_forward]}


def fraction(calls: dict, uncached: dict) -> float:
    """Mean of the attention and feed-forward fractions that ran, against the uncached run's calls."""
    return sum(sum(calls[k]) / sum(uncached[k]) for k in ("attention", "feed_forward")) / 2


def _fmt(value, digits: int) -> str:
    if value is None:
        return "-"
    return "inf" if isinstance(value, float) and math.isinf(value) else f"{value:.{digits}f}"


def _note(row: dict) -> str:
    notes = [row[k] for k in ("error", "note") if k in row]
    if "psnr_to_accel_same_config" in row:
        notes.append(f"{_fmt(row['psnr_to_accel_same_config'], 2)} dB to accel's same config")
    return "; ".join(notes)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"DiT caches on {meta['model']}: {meta['n']} CIFAR-10 prompts (seeds 0..{meta['n'] - 1}), FlowMatch Euler "
             f"{meta['steps']} steps, guidance {meta['guidance']}, batch {meta['batch_size']}, {meta['device']}; torch "
             f"{meta['torch']}, diffusers {meta['diffusers']}, cache-dit {meta['cache_dit']}. Block work: the share of "
             "the blocks' attention and feed-forward calls that ran (uncached = 1); effective speed-up: its inverse. "
             "PSNR / SSIM to the uncached images from the same seeds; Frechet distance to "
             f"{meta['real_images']} CIFAR-10 test images (the uncached run's in its row). Steps per block: attention "
             "calls per batch, blocks 0-4.", "",
             "| contender | computes | block work | eff. speed-up | s / image | PSNR (dB) | SSIM | adherence | Frechet "
             "| steps per block | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ran = sorted((r for r in report["rows"] if "error" not in r), key=lambda r: -r["effective_speedup"])
    for r in ran + [r for r in report["rows"] if "error" in r]:
        lines.append(f"| {r['label']} | {r['schedule']} | {_fmt(r.get('block_work'), 3)} | "
                     f"{_fmt(r.get('effective_speedup'), 2)} | {_fmt(r.get('seconds_per_image'), 5)} | "
                     f"{_fmt(r.get('psnr_db'), 2)} | {_fmt(r.get('ssim'), 3)} | {_fmt(r.get('adherence'), 3)} | "
                     f"{_fmt(r.get('frechet_distance'), 2)} | {r.get('steps_per_block', '-')} | "
                     f"{_note(r)} |")
    lines += ["", f"Command: `{meta['command']}` ({meta['elapsed_s']} s)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DIT_NAME, help="mini-sd3-cifar10 or a Stable Diffusion 3 pipeline folder")
    parser.add_argument("--n", type=int, default=1000, help="prompts, n / 10 per CIFAR-10 class, seeds 0..n-1")
    parser.add_argument("--steps", type=int, default=EMBEDDED_DIT_STEPS)
    parser.add_argument("--guidance", type=float, default=EMBEDDED_DIT_GUIDANCE)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--real-images", type=int, default=10_000,
                        help="CIFAR-10 test images (every k-th, all classes) the Frechet distance compares with")
    parser.add_argument("--contenders", default="", help="comma-separated substrings of the contenders' names or "
                        "families to run (default: all; the uncached runs always run)")
    parser.add_argument("--budget-s", type=float, default=200, help="contenders not started by then are skipped "
                        "(the final uncached run still runs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help=f"every contender on the CPU, small: {SMOKE}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dit-cache-quality"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        import cache_dit

        cache_dit_version = cache_dit.__version__
    except Exception as err:  # the Cache-DiT rows then say why they did not run
        cache_dit_version = f"not importable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    import diffusers

    pipe = load_model(args.model, args.device)
    prompts, labels = cifar_prompts(args.n)
    classifier = load_classifier(device=args.device)
    real = load_cifar10("test")[0]
    real = real[:: max(1, len(real) // args.real_images)]  # every k-th: the test set is sorted by class
    judge = Judge(torch.empty(0), labels, classifier, classifier_outputs(classifier, real)[1])
    work = BlockWork(pipe.transformer)
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": {"model": args.model, "n": args.n, "steps": args.steps, "guidance": args.guidance,
                       "batch_size": args.batch_size, "real_images": len(real), "smoke": args.smoke,
                       "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                       "torch": torch.__version__, "diffusers": diffusers.__version__, "cache_dit": cache_dit_version,
                       "command": "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])},
              "rows": []}
    options = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=0, batch_size=args.batch_size)
    # Kernels and allocations out of the first timing; the caches reset per call, so no other contender warms up.
    generate(pipe, prompts[:args.batch_size], **options, warmup=False)
    uncached, outputs = None, {}
    for contender in contenders(pipe, args.steps, args.guidance, prompts[:args.batch_size]):
        row = {"label": contender.name, "family": contender.family, "schedule": contender.computes}
        elapsed = time.perf_counter() - start
        if contender.family != "uncached" and wanted and not any(w in contender.name or w == contender.family
                                                                 for w in wanted):
            continue
        if contender.family != "uncached" and elapsed > args.budget_s:
            row["error"] = f"skipped: {elapsed:.0f} s spent (--budget-s {args.budget_s:g})"
        elif contender.family == "cache-dit" and not cache_dit_version[0].isdigit():
            row["error"] = f"cache-dit {cache_dit_version}"
        else:
            try:
                contender.enable(pipe)
                try:
                    work.reset()
                    images, seconds = generate(pipe, prompts, **options, warmup=False)
                finally:
                    contender.disable(pipe)
                calls = work.calls()
                if uncached is None:
                    uncached = {"images": images, "calls": calls}
                    judge.reference = images
                batches = math.ceil(args.n / args.batch_size)
                row = judge.row(contender.name, "FlowMatch Euler", contender.computes, args.steps, images, seconds,
                                family=contender.family)
                share = fraction(calls, uncached["calls"])
                row.update(seconds_per_image=seconds / args.n, block_work=share, effective_speedup=1 / share,
                           ssim=ssim(images.float() / 255, uncached["images"].float() / 255).mean().item(),
                           block_calls=calls, steps_per_block=[c / batches for c in calls["attention"]])
                outputs[contender.name] = images
                ours = outputs.get(contender.name.replace("cache-dit", "accel"))
                if contender.family == "cache-dit" and ours is not None:  # the same method, two implementations
                    row["psnr_to_accel_same_config"] = Judge(ours, labels, None, None).row(
                        f"{contender.name} vs accel", "", "", args.steps, images, 0.0)["psnr_db"]
                if share == 1 and contender.family != "uncached" and torch.equal(images, uncached["images"]):
                    row["note"] = "ran every block at every step: cached nothing here"
                if contender.name == UNCACHED_AGAIN:
                    row["note"] = ("identical to the first uncached run" if torch.equal(images, uncached["images"])
                                   else "DIFFERS from the first uncached run: a contender left something behind")
            except Exception as err:  # one failing contender must not lose the others
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                print(f"{contender.name:>22}: {row['error']}", flush=True)
        report["rows"].append(row)
        report["meta"]["elapsed_s"] = round(time.perf_counter() - start, 1)
        (args.out / "dit_cache_quality.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "dit_cache_quality.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
