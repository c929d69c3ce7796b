"""The `accel` command: generate, presets, eval, precompile, bench, batch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from apps.arguments import (
    GUIDANCE_HELP,
    SEED_HELP,
    SIZE_HELP,
    add_allow_large,
    add_app_arguments,
    add_batch_arguments,
    add_model_arguments,
)
from apps.checks import (
    SettingError,
    check_args,
    check_at_least,
    check_image_path,
    check_preset,
    check_setting,
    check_size_limit,
    check_size_multiple,
    check_writable_folder,
)


def cmd_generate(args) -> int:
    check_args(args, ("prompt", "seed", "steps", "guidance", "height", "width"))
    check_at_least("--num-images", args.num_images)
    out = check_image_path(args.out)
    check_preset(args.preset)

    import torch

    from accel.embedded import EMBEDDED_GUIDANCE, EMBEDDED_STEPS
    from apps.loading import load_pipeline, preset_config, without_compile

    rank, parallel = _parallel_config(args)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    sizes = {"--height": args.height, "--width": args.width}
    check_size_multiple(pipe, sizes)
    check_size_limit(pipe, sizes, args.allow_large)
    if args.preset or parallel is not None:
        import accel

        config = preset_config(args.preset, pipe)
        if not args.compile:
            config, note = without_compile(config)
            if note is not None:
                print(f"note: {note} (preset {args.preset!r}; --compile keeps it)", file=sys.stderr)
        accel.accelerate(pipe, config if parallel is None else config.replace(parallel=parallel))
    embedded = args.model is None
    if args.steps is None and embedded and not args.preset:
        args.steps = EMBEDDED_STEPS
    if args.guidance is None:
        args.guidance = EMBEDDED_GUIDANCE if embedded else _dit_guidance(args.model)
    call = {"prompt": args.prompt, "guidance_scale": args.guidance, "num_images_per_prompt": args.num_images}
    if args.negative_prompt:
        call["negative_prompt"] = args.negative_prompt
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if args.height is not None:
        call["height"] = args.height
    if args.width is not None:
        call["width"] = args.width
    call["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    start = time.perf_counter()
    try:
        images = pipe(**call).images
    except (RuntimeError, MemoryError) as err:
        # CUDA raises torch.OutOfMemoryError, the CPU allocator a RuntimeError saying so: either way its traceback
        # says nothing a user can act on
        if not (isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)):
            raise
        raise SystemExit(f"error: out of memory on {pipe.device} generating {args.num_images} image(s) of "
                         f"{args.height or 'default'} x {args.width or 'default'} px; use a smaller size or fewer "
                         "--num-images") from None
    seconds = time.perf_counter() - start
    if rank != 0:  # every rank holds the same images; rank 0 saves them
        return 0
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    where = ", ".join(str(p) for p in paths)
    print(f"generated {len(images)} image(s) in {seconds:.2f} s on {pipe.device} ({args.preset or 'no preset'}): {where}")
    return 0


def _parallel_config(args):
    """(rank, PatchParallelConfig or None); under a launcher, joins its process group and picks this rank's GPU."""
    if not getattr(args, "parallel", None):
        return 0, None
    import accel
    from accel.parallel import PatchParallelConfig, init_distributed

    runtime = accel.resolve_config(preset=args.preset).runtime if args.preset else None
    if runtime is not None and runtime.compile and runtime.covers_denoiser:
        raise SystemExit(f"--parallel does not compose with torch.compile of the denoiser (preset {args.preset!r} compiles "
                         "it); use a preset without compile, or no preset (CUDA graphs do compose)")
    try:
        config = PatchParallelConfig(mode=args.parallel, warmup_steps=args.parallel_warmup, sync=args.parallel_sync)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    rank, _, args.device = init_distributed(args.device)
    return rank, config


def cmd_presets(args) -> int:
    import accel

    for flow in (False, True):
        if flow:
            print("\nflow-matching pipelines (SD3, Flux, Sana): the same names")
        for name, text, config in accel.describe_presets(flow=flow):
            print(f"{name:10s} {text}")
            if args.verbose:
                print(f"           {config!r}")
    return 0


def _dit_guidance(model) -> float:
    """The embedded DiT's guidance for it, 7.5 for any other model; its default steps are SD3's own (28)."""
    from accel.embedded_dit import EMBEDDED_DIT_GUIDANCE, is_embedded_dit

    return EMBEDDED_DIT_GUIDANCE if is_embedded_dit(model) else 7.5


def cmd_eval(args) -> int:
    check_args(args, ("seed", "steps", "guidance"))
    check_at_least("--n", args.n)
    check_at_least("--batch-size", args.batch_size)
    check_setting("seed", args.seed + args.n - 1, f"--seed {args.seed} + --n {args.n} - 1 (the last image's seed)")
    check_preset(args.preset)
    check_writable_folder(Path(args.out), "--out")

    from accel.embedded import EMBEDDED_GUIDANCE
    from accel.quality.evaluate import evaluate, write_report
    from apps.loading import load_pipeline, preset_config

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    if args.guidance is None:
        args.guidance = EMBEDDED_GUIDANCE if args.model is None else _dit_guidance(args.model)
    classifier = None
    if args.classifier is not None:
        from accel.quality.classifier import load_classifier

        classifier = load_classifier(args.classifier, device=pipe.device)
    result = evaluate(
        pipe,
        config=preset_config(args.preset, pipe) if args.preset else None,
        n=args.n,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        classifier=classifier,
    )
    result["preset"] = args.preset  # the report's name for the config above
    paths = write_report(result, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """`--sizes 512x512,768x512` as [(height, width), ...], each checked as `--height` / `--width` are."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise SettingError(f"--sizes item {item.strip()!r} is not a size; accepted: HEIGHTxWIDTH in pixels, "
                               "comma-separated, e.g. 512x512,768x512")
        height, width = int(parts[0]), int(parts[1])
        check_setting("height", height, f"--sizes {item.strip()}: height")
        check_setting("width", width, f"--sizes {item.strip()}: width")
        sizes.append((height, width))
    return sizes


def precompile(pipe, config, sizes: list[tuple[int, int]], out, call: dict) -> dict:
    """Compile `config` (an AccelConfig with torch.compile) on `pipe` with one generation per (height, width) of
    `sizes` (pipeline arguments `call`, seed 0) and save the portable compile artifacts into the folder `out`.
    Returns the seconds per size ("seconds": {"HxW": s}) and the files loaded and saved (`compile_cache_report`);
    `pipe` is restored afterwards."""
    from dataclasses import replace

    import torch

    import accel
    from accel.runtime import compile_cache_report
    from accel.runtime.artifacts import saving_whole_forwards

    runtime = replace(config.runtime, compile_cache=str(Path(out)))
    if pipe.device.type != "cuda" and runtime.cuda_graph:  # the compiled code is what is saved; graphs are not
        runtime = replace(runtime, cuda_graph=False)
        print(f"note: CUDA graphs need a CUDA GPU; this runs on {pipe.device.type}, so they were left out", file=sys.stderr)
    accel.accelerate(pipe, config.replace(runtime=runtime))
    seconds = {}
    try:
        for height, width in sizes:
            start = time.perf_counter()
            with saving_whole_forwards():  # and each compiled module's whole forward: no trace in a new process
                pipe(**call, height=height, width=width, generator=torch.Generator("cpu").manual_seed(0))
            seconds[f"{height}x{width}"] = time.perf_counter() - start
            print(f"{height}x{width}: {seconds[f'{height}x{width}']:.1f} s")
        report = compile_cache_report(pipe)
    finally:
        accel.restore(pipe)
    return {"seconds": seconds, **report}


def cmd_precompile(args) -> int:
    sizes = parse_sizes(args.sizes)
    check_args(args, ("steps", "guidance"))
    check_at_least("--num-images", args.num_images)
    check_preset(args.preset)
    check_writable_folder(Path(args.out), "--out")

    import accel
    from accel.embedded import EMBEDDED_GUIDANCE
    from apps.loading import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    config = accel.resolve_config(preset=args.preset, pipe=pipe)
    if config.runtime is None or config.runtime.compile is None:
        raise SettingError(f"--preset {args.preset} compiles nothing, so there is nothing to precompile; accepted: "
                           "a preset with torch.compile (see `accel presets -v`)")
    check_size_multiple(pipe, {f"--sizes {h}x{w}": v for h, w in sizes for v in (h, w)})
    if args.guidance is None:
        args.guidance = EMBEDDED_GUIDANCE if args.model is None else _dit_guidance(args.model)
    call = {"prompt": args.prompt, "guidance_scale": args.guidance, "num_images_per_prompt": args.num_images}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    report = precompile(pipe, config, sizes, args.out, call)
    for path in report["loaded"]:
        print(f"already there (loaded, not rewritten): {path}")
    for path in report["saved"]:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Accelerated diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="any text that is not blank")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=None,
                     help="denoising steps, >= 1 (default: the preset's, else the pipeline's)")
    gen.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    gen.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    gen.add_argument("--height", type=int, default=None, help=SIZE_HELP)
    gen.add_argument("--width", type=int, default=None, help=SIZE_HELP)
    add_allow_large(gen)
    gen.add_argument("--num-images", type=int, default=1, help=">= 1; N > 1 writes OUT-0.png ... OUT-{N-1}.png")
    gen.add_argument("--out", default="out.png", help="image file: .png, .jpg, .webp or another extension Pillow "
                     "writes; checked before the model loads (default: out.png)")
    gen.add_argument("--parallel", default=None, choices=["patch", "cfg", "patch+cfg"],
                     help="one image on every process of a launcher (torchrun --nproc-per-node N / accelerate launch): "
                          "rows split over the processes (patch), the CFG batch over 2 (cfg), or both (4+ processes); "
                          "every process uses the same --seed")
    gen.add_argument("--parallel-warmup", type=int, default=4, help="synchronous steps before patches exchange "
                     "one-step-stale activations (default: 4)")
    gen.add_argument("--parallel-sync", action="store_true", help="every step synchronous: equals one GPU's output")
    gen.add_argument("--compile", action="store_true", help="compile as the preset says before the one call (SD1.5 "
                     "balanced on an H200: 68 s cold, 12.6 s from `accel precompile` artifacts); by default this "
                     "one-call command runs the preset's other settings eagerly, as a background compile's first "
                     "image would, and starts no compile")
    gen.set_defaults(func=cmd_generate)

    pre = sub.add_parser("presets", help="list the named presets")
    pre.add_argument("-v", "--verbose", action="store_true", help="print each preset's full config")
    pre.set_defaults(func=cmd_presets)

    ev = sub.add_parser("eval", help="measure the quality cost of a preset against the unaccelerated pipeline")
    add_model_arguments(ev)
    ev.add_argument("--n", type=int, default=1000, help="number of images, >= 1")
    ev.add_argument("--steps", type=int, default=20, help="denoising steps, >= 1")
    ev.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    ev.add_argument("--seed", type=int, default=0, help="image i gets seed + i; " + SEED_HELP)
    ev.add_argument("--batch-size", type=int, default=100, help=">= 1")
    ev.add_argument("--classifier", default=None,
                    help="adherence classifier folder (default: the shipped accel/models/cifar10-classifier)")
    ev.add_argument("--out", default="eval-results", help="folder for the JSON and markdown report")
    ev.set_defaults(func=cmd_eval)

    pc = sub.add_parser("precompile", help="compile a preset at the given sizes and save the portable compile artifacts "
                        "that `RuntimeConfig(compile_cache=...)` loads")
    add_model_arguments(pc)
    pc.add_argument("--sizes", required=True, help="HEIGHTxWIDTH in pixels, comma-separated, e.g. 512x512,768x512")
    pc.add_argument("--out", required=True, help="folder for the artifacts (the compile_cache folder to use later)")
    pc.add_argument("--prompt", default="a photo", help="the text of the compiling generations")
    pc.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the preset's, else the "
                    "pipeline's); compile only at the steps later runs take")
    pc.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP + "; on or off (above 1 or not) "
                    "is part of the artifacts' key")
    pc.add_argument("--num-images", type=int, default=1, help="images per generation, >= 1: part of the key, as later runs")
    pc.set_defaults(func=cmd_precompile)

    _add_bench_parser(sub)
    _add_batch_parser(sub)
    _add_distill_lcm_parser(sub)
    _add_prune_parsers(sub)
    _add_app_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark stock diffusers against accelerated configs on this GPU")
    p.add_argument("--arch", default="sd15", help="sd15, sd21, sdxl (random weights) or embedded")
    p.add_argument("--configs", default="stock,graph,compiled", help="comma-separated names from apps.bench.bench_configs()")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="dpmpp_2m", help="stock scheduler: ddim, dpmpp_2m, euler, unipc")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--unet-step", action="store_true", help="also time the UNet step alone at CFG batch 2")
    p.add_argument("--interleave", action="store_true",
                   help="time the configs round by round (one call each per round) instead of one after another: "
                        "on a host whose speed drifts, every config sees the same drift (eager configs only)")
    p.add_argument("--out", default="benchmarks/results/bench")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from apps.bench import main as bench_main

    return bench_main(args)


def _add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="generate images for every line of a prompt file, on every process launched")
    add_batch_arguments(p)
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from apps.batch_generate import run

    return run(args)


def _add_app_parser(sub) -> None:
    p = sub.add_parser("app", help="the Gradio app: baseline and accelerated side by side, and the speed/quality plot")
    add_app_arguments(p)
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    from apps.gradio_app import run

    return run(args)


def _add_distill_lcm_parser(sub) -> None:
    p = sub.add_parser("distill-lcm", help="distil a teacher into a few-step latent consistency model (LCM / LCM-LoRA)")
    p.add_argument("--teacher", default=None, help="Stable Diffusion 1.x/2.x or SDXL folder or Hub id (default: the embedded model)")
    p.add_argument("--data", default="cifar10", help="'cifar10' (archives from ACCEL_CIFAR10_DIR) or a folder of images with same-stem .txt captions")
    p.add_argument("--out", required=True, help="folder for the LoRA (or student pipeline), checkpoint and lcm_distill.json")
    p.add_argument("--variant", default="lora", choices=["lora", "full"], help="LoRA (fixed guidance) or full UNet (guidance embedded)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (a resumed run continues to this)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (lora), 2e-5 (full)")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: 4 on the embedded model, else 7.5)")
    p.add_argument("--guidance-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="draw the teacher's CFG scale per sample from [LOW, HIGH] (the full student embeds it)")
    p.add_argument("--solver", default="ddim", help="teacher ODE solver: ddim or any sampler name of samplers/")
    p.add_argument("--original-inference-steps", type=int, default=50, help="distillation schedule length (skip k = 1000 / this)")
    p.add_argument("--loss", default="huber", choices=["huber", "l2"])
    p.add_argument("--ema-decay", type=float, default=None, help="target network EMA (default: 0.95 full, 0 lora)")
    p.add_argument("--time-budget", type=float, default=None, help="stop and save after this many seconds")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="default: bf16 on CUDA, else no")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute student activations (SDXL at 1024 px)")
    p.add_argument("--resolution", type=int, default=None, help="image size of a caption folder (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="use the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/checkpoint exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.set_defaults(func=cmd_distill_lcm)


def cmd_distill_lcm(args) -> int:
    import json

    from accel.embedded import EMBEDDED_GUIDANCE
    from apps.loading import load_pipeline
    from distill.data import load_captioned_images
    from distill.lcm import LCMDistillConfig, distill_lcm

    pipe = load_pipeline(args.teacher, device=args.device, dtype=None)
    guidance = args.guidance if args.guidance is not None else (EMBEDDED_GUIDANCE if args.teacher is None else 7.5)
    config = LCMDistillConfig(
        variant=args.variant, lora_rank=args.lora_rank, max_steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, guidance_scale=guidance,
        guidance_range=tuple(args.guidance_range) if args.guidance_range else None, solver=args.solver,
        original_inference_steps=args.original_inference_steps, loss=args.loss, ema_decay=args.ema_decay,
        time_budget=args.time_budget, checkpoint_every=args.checkpoint_every, seed=args.seed,
        mixed_precision=args.mixed_precision or ("bf16" if pipe.device.type == "cuda" else "no"),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_captioned_images(args.data, resolution, limit=args.limit)
    summary = distill_lcm(pipe, data, args.out, config, resume=not args.no_resume)
    print(json.dumps({k: summary[k] for k in ("variant", "steps", "train_seconds", "loss_first", "loss_last", "saved")}))
    return 0


def _add_prune_parsers(sub) -> None:
    p = sub.add_parser("prune", help="remove UNet blocks (BK-SDM variants or LAPTOP-Diff one-shot selection)")
    p.add_argument("--model", default=None, help="diffusers pipeline folder (default: the embedded CIFAR-10 model)")
    p.add_argument("--method", required=True, help="bk-base, bk-small, bk-tiny or laptop")
    p.add_argument("--ratio", type=float, default=0.4, help="laptop: share of the UNet's --target to remove")
    p.add_argument("--target", default="params", help="laptop: params, macs or latency")
    p.add_argument("--calibration-prompts", type=int, default=16, help="laptop: prompts (CIFAR-10 classes) per timestep")
    p.add_argument("--calibration-timesteps", type=int, default=8, help="laptop: timesteps, evenly spread over training")
    p.add_argument("--max-transformer-depth", type=int, default=None, help="bk-*: keep at most this many transformer blocks per layer (KOALA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="folder for the pruned UNet (save_pretrained) and pruning_report.json/.md")
    p.set_defaults(func=cmd_prune)

    d = sub.add_parser("distill", help="retrain a pruned UNet by knowledge distillation from its teacher")
    d.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the embedded CIFAR-10 model)")
    d.add_argument("--student", required=True, help="pruned UNet folder from `accel prune`")
    d.add_argument("--data", default="cifar10", help="cifar10[:train|:test] or an image folder with same-stem .txt captions")
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--time-budget", type=float, default=None, help="stop (and save) after this many seconds")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--limit", type=int, default=None, help="use only the first N images")
    d.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    d.add_argument("--gradient-checkpointing", action="store_true")
    d.add_argument("--checkpoint-every", type=int, default=500)
    d.add_argument("--device", default="auto")
    d.add_argument("--out", required=True, help="folder: checkpoint/ (resumed if present) and unet/ (the EMA student)")
    d.set_defaults(func=cmd_distill)


def _teacher_pipeline(model, device):
    from apps.loading import load_pipeline

    return load_pipeline(model, device=device)


def cmd_prune(args) -> int:
    import json

    import pruning

    from accel.errors import check_choice

    try:
        check_choice("--method", args.method, pruning.METHODS)
        check_choice("--target", args.target, pruning.LAPTOP_TARGETS)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    pipe = _teacher_pipeline(args.model, args.device)
    teacher = pipe.unet.eval()
    if args.method == "laptop":
        from accel.conditioning import encode_conditioning
        from accel.embedded import CIFAR10_CLASSES, eval_prompt

        prompts = [eval_prompt(CIFAR10_CLASSES[i % 10]) for i in range(args.calibration_prompts)]
        try:  # text states (SD 1.x/2.x), plus pooled text embeds and time ids (SDXL)
            conditioning = encode_conditioning(pipe, prompts, unconditional=False)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        calibration = pruning.calibration_inputs(teacher, conditioning, pipe.scheduler.config,
                                                 num_timesteps=args.calibration_timesteps)
        student, info = pruning.laptop_unet(teacher, calibration, args.ratio, target=args.target)
        removed, extra = info["removed_blocks"], {"target": args.target, "ratio": args.ratio, "saved": info["saved"]}
    else:
        student, _ = pruning.bk_sdm_unet(teacher, args.method[3:], max_transformer_depth=args.max_transformer_depth)
        removed, extra = [], {}
    report = pruning.pruning_report(teacher, student, method=args.method, removed_blocks=removed, extra=extra)
    pruning.save_unet(student, args.out, report)
    print(json.dumps({k: report[k] for k in ("method", "params_ratio", "macs_ratio", "latency_ratio")}))
    print(f"saved the pruned UNet and pruning_report.json/.md to {args.out}")
    return 0


def cmd_distill(args) -> int:
    import json

    import pruning
    from accel.conditioning import encode_conditioning
    from distill.data import encode_latents, load_captioned_images
    from distill.kd import KDConfig, distill_unet

    pipe = _teacher_pipeline(args.teacher, args.device)
    if not hasattr(pipe, "encode_prompt"):
        raise SystemExit(f"accel distill needs a Stable Diffusion 1.x/2.x or SDXL pipeline, got {type(pipe).__name__}")
    try:
        student = pruning.load_unet(args.student).to(pipe.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    config = KDConfig(max_steps=args.steps, time_budget=args.time_budget, batch_size=args.batch_size,
                      learning_rate=args.lr, mixed_precision=args.mixed_precision,
                      gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_captioned_images(args.data, resolution, limit=args.limit)
    latents = encode_latents(pipe.vae, data)
    captions = encode_conditioning(pipe, data.captions, resolution=resolution)  # SDXL: pooled embeds, time ids
    result = distill_unet(pipe.unet, student, latents, captions, pipe.scheduler.config, config, args.out)
    student = result.pop("student")
    pruning.save_unet(student, Path(args.out) / "unet")
    (Path(args.out) / "distill_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "train_seconds", "batch_size")}))
    print(f"saved the distilled student to {Path(args.out) / 'unet'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, SettingError) as err:  # a missing model or file, a bad setting: its message, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
