"""The `accel` command: generate, presets, eval, bench, batch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The embedded model's defaults: its quality was measured at DPM-Solver++ 20 steps, guidance 4.
EMBEDDED_STEPS = 20
EMBEDDED_GUIDANCE = 4.0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers folder or Hub id (default: the embedded CIFAR-10 model)")
    p.add_argument("--preset", default=None, help="acceleration preset (see `accel presets`); default: none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="load weights in this dtype")


def cmd_generate(args) -> int:
    import torch

    from apps.loading import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    if args.preset:
        import accel

        accel.accelerate(pipe, preset=args.preset)
    embedded = args.model is None
    if args.steps is None and embedded and not args.preset:
        args.steps = EMBEDDED_STEPS
    if args.guidance is None:
        args.guidance = EMBEDDED_GUIDANCE if embedded else 7.5
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
    images = pipe(**call).images
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    where = ", ".join(str(p) for p in paths)
    print(f"generated {len(images)} image(s) in {seconds:.2f} s on {pipe.device} ({args.preset or 'no preset'}): {where}")
    return 0


def cmd_presets(args) -> int:
    import accel

    for name, text, config in accel.describe_presets():
        print(f"{name:10s} {text}")
        if args.verbose:
            print(f"           {config!r}")
    return 0


def cmd_eval(args) -> int:
    from accel.quality import evaluate, write_report
    from apps.loading import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    if args.guidance is None:
        args.guidance = EMBEDDED_GUIDANCE if args.model is None else 7.5
    result = evaluate(
        pipe,
        preset=args.preset,
        n=args.n,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    paths = write_report(result, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Accelerated diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's, else the pipeline's)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: 4 on the embedded model, else 7.5)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=cmd_generate)

    pre = sub.add_parser("presets", help="list the named presets")
    pre.add_argument("-v", "--verbose", action="store_true", help="print each preset's full config")
    pre.set_defaults(func=cmd_presets)

    ev = sub.add_parser("eval", help="measure the quality cost of a preset against the unaccelerated pipeline")
    _add_model_args(ev)
    ev.add_argument("--n", type=int, default=1000, help="number of images")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=None, help="default: 4 on the embedded model, else 7.5")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=100)
    ev.add_argument("--out", default="eval-results", help="folder for the JSON and markdown report")
    ev.set_defaults(func=cmd_eval)

    _add_bench_parser(sub)
    _add_batch_parser(sub)
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
    p.add_argument("--out", default="benchmarks/results/bench")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from apps.bench import main as bench_main

    return bench_main(args)


def _add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="generate images for every line of a prompt file, on every process launched")
    p.add_argument("prompts", help="prompt file: text (one per line), .jsonl or .csv (see apps/batch_generate.py)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="folder for the images and manifest.jsonl")
    p.add_argument("--format", default=None, choices=["txt", "jsonl", "csv"], help="default: from the file extension")
    p.add_argument("--batch-size", type=int, default=1, help="items of equal settings per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="item i gets seed + i unless it sets its own")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="default: 20 on the embedded model, else the preset's or pipeline's")
    p.add_argument("--guidance", type=float, default=None, help="default: 4 on the embedded model, else 7.5")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from apps.batch_generate import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
