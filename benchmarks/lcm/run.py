"""LCM and LCM-LoRA on the embedded model (issue 8): distil, then measure against the teacher in one run.

1. Distil the embedded teacher (DPM-Solver++ model, guidance 4) on CIFAR-10 twice, each within a time
   budget: an LCM-LoRA (fixed guidance, sampled without CFG) and a full LCM UNet (guidance embedded).
2. Generate the same 1,000 CIFAR-10 prompts (100 per class, seeds 0..999) with the teacher at 20
   DPM-Solver++ steps (and at 4 and 8, for reference) and with both students at 1, 2, 4 and 8 steps; score
   prompt adherence and Frechet distance with the project's classifier (accel/quality).
3. Time every config end to end (text encoding, denoising, VAE decode, PIL output), fp16, CUDA-synchronised
   medians at batch 1 and batch 100.

    python benchmarks/lcm/run.py --out out/lcm               # the GPU run (see run.sh)
    python benchmarks/lcm/run.py --smoke --out out/lcm-smoke # CPU, tiny sizes, end to end
    python benchmarks/lcm/run.py --out out/lcm --variants lora --steps-list 4 2  # the LoRA alone, 4 and 2 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

TEACHER_STEPS = 20
TEACHER_GUIDANCE = 4.0  # the embedded model's evaluated setting (model card)
STUDENT_STEPS = (4, 1, 2, 8)  # in the order measured: the target's 4 steps first
VARIANTS = ("lora", "full")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, a few steps and images: checks the script end to end")
    p.add_argument("--variants", type=_variants, default=VARIANTS,
                   help="comma-separated students to distil and evaluate: lora, full (default: lora,full)")
    p.add_argument("--steps-list", type=int, nargs="+", default=list(STUDENT_STEPS),
                   help="student step counts, measured in this order (default: 4 1 2 8)")
    p.add_argument("--lora-seconds", type=float, default=140.0)
    p.add_argument("--full-seconds", type=float, default=140.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=32, help="32: 3.6 M parameters, 28%% of the UNet")
    p.add_argument("--lora-lr", type=float, default=3e-4)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--lora-guidance", type=float, default=TEACHER_GUIDANCE, help="the LoRA's fixed teacher guidance")
    p.add_argument("--full-guidance-range", type=float, nargs=2, default=(2.0, 6.0))
    p.add_argument("--full-eval-guidance", type=float, default=TEACHER_GUIDANCE, help="guidance the full student embeds at test")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 100])
    p.add_argument("--latency-runs", type=int, default=7)
    p.add_argument("--deadline", type=float, default=470.0, help="skip the configs still to measure after this many seconds")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.steps_list):
        p.error(f"--steps-list takes positive step counts, got {args.steps_list}")
    if args.smoke:
        args.lora_seconds = args.full_seconds = None
        args.batch_size, args.n, args.eval_batch = 4, 10, 10
        args.latency_batches, args.latency_runs = [1, 2], 1
    return args


def _variants(text: str) -> tuple[str, ...]:
    variants = tuple(v.strip() for v in text.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"{text!r}: valid choices are comma-separated {', '.join(VARIANTS)}")
    return tuple(v for v in VARIANTS if v in variants)


def save_lora_fp16(folder: Path, out_dir: Path) -> Path:
    """The LoRA's tensors in float16 (half the size; inference loads them in fp16 anyway), metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k).to(torch.float16) for k in f.keys()}
        metadata = f.metadata()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / source.name), metadata=metadata)
    return out_dir / source.name


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def latency(pipe, *, batch: int, steps: int, guidance: float, runs: int) -> float:
    """Median seconds of one end-to-end call (PIL output) of `batch` prompts, after one warm-up call."""
    prompts = ["a photo of a horse"] * batch
    times = []
    for i in range(runs + 1):
        generator = torch.Generator(pipe._execution_device).manual_seed(i)
        _sync(pipe._execution_device)
        tic = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pil")
        _sync(pipe._execution_device)
        if i:  # the first call warms up kernels and allocator
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


class Scorer:
    """Adherence and Frechet distance of generated images (the quality harness's classifier and metrics)."""

    def __init__(self, device, smoke: bool):
        from accel.quality.cifar import load_cifar10
        from accel.quality.classifier import load_classifier
        from accel.quality.evaluate import classifier_outputs

        self.classifier = load_classifier(device=device)
        reference = load_cifar10("test", limit=200 if smoke else None)[0]
        self.reference_features = classifier_outputs(self.classifier, reference)[1]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        from accel.quality.evaluate import classifier_outputs
        from accel.quality.frechet import frechet_distance

        predicted, features = classifier_outputs(self.classifier, images)
        return {
            "adherence": (predicted == labels).double().mean().item(),
            "frechet_distance": frechet_distance(features, self.reference_features),
        }


def evaluate_config(pipe, name: str, *, steps: int, guidance: float, args, scorer, rows: list, extra: dict) -> dict:
    from accel.quality.evaluate import cifar_prompts, generate

    prompts, labels = cifar_prompts(args.n)
    images, seconds = generate(pipe, prompts, num_inference_steps=steps, guidance_scale=guidance, seed=0,
                               batch_size=args.eval_batch)
    row = {"config": name, "steps": steps, "guidance_scale": guidance, "n": args.n, **extra, **scorer(images, labels),
           "generate_seconds": round(seconds, 3)}
    for batch in args.latency_batches:
        row[f"latency_b{batch}_s"] = latency(pipe, batch=batch, steps=steps, guidance=guidance, runs=args.latency_runs)
    rows.append(row)
    print(f"[lcm] {name:28s} {steps:2d} steps: adherence {row['adherence']:.3f}  FD {row['frechet_distance']:.2f}  "
          + "  ".join(f"b{b} {row[f'latency_b{b}_s'] * 1000:.1f} ms" for b in args.latency_batches), flush=True)
    return row


def distil(variant: str, args, device, data) -> dict:
    from accel.embedded import load_embedded_pipeline
    from distill.lcm import LCMDistillConfig, distill_lcm

    teacher = load_embedded_pipeline(device, torch.float32)
    common = dict(batch_size=args.batch_size, mixed_precision="bf16" if device == "cuda" else "no", warmup_steps=50,
                  checkpoint_every=10**9, max_steps=2 if args.smoke else 100_000)
    if variant == "lora":
        config = LCMDistillConfig(variant="lora", lora_rank=args.lora_rank, learning_rate=args.lora_lr,
                                  guidance_scale=args.lora_guidance, time_budget=args.lora_seconds, **common)
    else:
        config = LCMDistillConfig(variant="full", learning_rate=args.full_lr, guidance_range=tuple(args.full_guidance_range),
                                  time_budget=args.full_seconds, **common)
    summary = distill_lcm(teacher, data, args.out / variant, config, resume=False, disable_progress=True)
    print(f"[lcm] distilled {variant}: {summary['steps']} steps in {summary['train_seconds']} s, "
          f"loss {summary['loss_first']:.5f} -> {summary['loss_last']:.5f}", flush=True)
    del teacher
    return summary


def markdown(result: dict) -> str:
    rows = result["rows"]
    teacher = next(r for r in rows if r["config"] == "teacher" and r["steps"] == TEACHER_STEPS)
    batches = result["latency_batches"]
    lines = [
        "# LCM / LCM-LoRA on the embedded model",
        "",
        f"{result['device']}; {rows[0]['n']} CIFAR-10 prompts (seeds 0..{rows[0]['n'] - 1}); fp16 inference; latency = "
        "median end-to-end call (text encoder, denoising, VAE, PIL); speed-up against the teacher at 20 steps.",
        "",
        "| config | steps | guidance | adherence | Frechet distance | "
        + " | ".join(f"latency b{b} (ms) | speed-up b{b}" for b in batches) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in batches) + " |",
    ]
    for r in rows:
        cells = []
        for b in batches:
            cells += [f"{r[f'latency_b{b}_s'] * 1000:.1f}", f"{teacher[f'latency_b{b}_s'] / r[f'latency_b{b}_s']:.2f}x"]
        lines.append(f"| {r['config']} | {r['steps']} | {r['guidance_scale']:g} | {100 * r['adherence']:.1f}% | "
                     f"{r['frechet_distance']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Distillation:", ""]
    for variant, s in result["distill"].items():
        lines.append(f"- {variant}: {s['steps']} steps x batch {s['config']['batch_size']} in {s['train_seconds']} s, "
                     f"lr {s['config']['learning_rate']}, loss {s['loss_first']:.5f} -> {s['loss_last']:.5f}, "
                     f"{s['trainable_parameters']:,} trainable parameters")
    if result.get("skipped"):
        lines += ["", f"Not measured (out of time): {', '.join(result['skipped'])}"]
    target = result.get("target")
    if target:
        lines += ["", f"Target (4-step LoRA within 5 points of the teacher's adherence at >= 4x its speed): {target}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    from accel.embedded import load_embedded_pipeline
    from distill.data import load_captioned_images

    data = load_captioned_images("cifar10:train", 32, limit=64 if args.smoke else None)
    print(f"[lcm] {len(data)} training images loaded at {time.monotonic() - start:.0f} s", flush=True)
    distill = {variant: distil(variant, args, device, data) for variant in args.variants}
    if "lora" in distill:  # what comes back from the device: the fp32 LoRA is too large for it
        save_lora_fp16(args.out / "lora", args.out / "lora-fp16")
    print(f"[lcm] distillation done at {time.monotonic() - start:.0f} s", flush=True)

    import accel
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    dtype = torch.float32 if args.smoke else torch.float16
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "smoke": args.smoke,
        "latency_batches": args.latency_batches,
        "variants": list(args.variants),
        "rows": [],
        "skipped": [],
        "distill": distill,
    }
    rows = result["rows"]

    def measure(pipe, name, steps, guidance, sampler):
        if time.monotonic() - start > args.deadline:  # keep what is measured rather than lose all to the kill
            result["skipped"].append(f"{name} {steps} steps")
            return
        evaluate_config(pipe, name, steps=steps, guidance=guidance, args=args, scorer=scorer, rows=rows,
                        extra={"sampler": sampler})
        result["seconds"] = round(time.monotonic() - start, 1)
        write(result, args.out)

    scorer = Scorer(device, args.smoke)
    pipe = load_embedded_pipeline(device, dtype)  # diffusers' DPMSolverMultistepScheduler (its shipped scheduler)
    measure(pipe, "teacher", TEACHER_STEPS, TEACHER_GUIDANCE, "dpmpp_2m")
    if "lora" in args.variants:
        # fused into the base weights (LCMLoRAConfig.fuse, the default)
        accel.accelerate(pipe, accel.AccelConfig(model=accel.LCMLoRAConfig(path=str(args.out / "lora"))))
        for steps in args.steps_list:
            measure(pipe, "LCM-LoRA", steps, 1.0, "lcm")
        accel.restore(pipe)
    if "full" in args.variants:
        student_unet = UNet2DConditionModel.from_pretrained(args.out / "full" / "pipeline" / "unet", torch_dtype=dtype)
        full = StableDiffusionPipeline(**{**pipe.components, "unet": student_unet.to(device)})
        full.scheduler = accel_lcm_scheduler(pipe.scheduler)
        full.set_progress_bar_config(disable=True)
        for steps in args.steps_list:
            measure(full, "LCM (full UNet)", steps, args.full_eval_guidance, "lcm")
    for steps in (4, 8):  # the teacher cut to as few steps, for reference
        measure(pipe, "teacher", steps, TEACHER_GUIDANCE, "dpmpp_2m")
    write(result, args.out)
    print(markdown(result))
    return result


def write(result: dict, out: Path) -> None:
    rows = result["rows"]
    teacher = next((r for r in rows if r["config"] == "teacher" and r["steps"] == TEACHER_STEPS), None)
    lora4 = next((r for r in rows if r["config"] == "LCM-LoRA" and r["steps"] == 4), None)
    if teacher and lora4:
        points = 100 * (teacher["adherence"] - lora4["adherence"])
        speedups = {b: teacher[f"latency_b{b}_s"] / lora4[f"latency_b{b}_s"] for b in result["latency_batches"]}
        verdict = lambda ok: "met" if ok else "not met"  # noqa: E731
        result["target"] = (f"adherence {points:+.1f} points below the teacher ({verdict(points <= 5)}); speed-up "
                            + ", ".join(f"{v:.2f}x at batch {b} ({verdict(points <= 5 and v >= 4)})"
                                        for b, v in speedups.items()))
    (out / "lcm.json").write_text(json.dumps(result, indent=2) + "\n")
    if teacher:
        (out / "lcm.md").write_text(markdown(result))


def accel_lcm_scheduler(base):
    """The suite's LCM sampler on the teacher's noise schedule, 50-step distillation schedule."""
    import samplers

    return samplers.make_scheduler("lcm", base=base)


if __name__ == "__main__":
    main()
