"""Encoder propagation's default on the embedded model: latency, PSNR, adherence, Frechet distance (issue 6).

    bash benchmarks/cache/encprop_quality.sh            # GPU, through the device tool (carry .whl), < 3 min
    SMOKE=1 bash benchmarks/cache/encprop_quality.sh    # CPU, tiny sizes, end to end

For DPM-Solver++ 20 steps and DDIM 50 steps (guidance 4), the same CIFAR-10 prompts and seeds run
uncached, with `EncoderPropagationConfig()` (the calibrated default), with the default plus
`parallel_decode=True`, with every third step as key step (held adherence at DDIM 50 on CPU, not at
20 steps) and with the paper's DDIM-50 key set scaled to the step count (the previous default). Per config: images per second at batch `--batch-size` (1000 images), the median latency of one
image (batch 1, CFG), PSNR / SSIM to the uncached images, prompt adherence and the Frechet distance in the
CIFAR-10 classifier's features to the CIFAR-10 test set. Writes encprop_quality.json / .md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import accel
from accel import AccelConfig, EncoderPropagationConfig
from accel.cache import key_steps
from accel.cache.faster_diffusion import paper_key_steps
from accel.embedded import load_embedded_pipeline
from accel.quality.cifar import load_cifar10
from accel.quality.classifier import load_classifier
from accel.quality.evaluate import DEFAULT_GUIDANCE_SCALE, cifar_prompts, classifier_outputs, generate
from accel.quality.frechet import frechet_distance
from accel.quality.metrics import psnr, ssim


def configs(num_steps: int) -> dict[str, EncoderPropagationConfig | None]:
    return {
        "uncached": None,
        "default": EncoderPropagationConfig(),
        "default+parallel_decode": EncoderPropagationConfig(parallel_decode=True),
        "key_interval=3": EncoderPropagationConfig(key_interval=3),
        "paper key steps (previous default)": EncoderPropagationConfig(key_steps=paper_key_steps(num_steps)),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_image_latency(pipe, steps: int, calls: int) -> float:
    """Median seconds of one 1-image call (CFG, so the UNet sees batch 2), after one warm-up call."""
    device = pipe._execution_device
    times = []
    for i in range(calls + 1):
        _sync(device)
        tic = time.perf_counter()
        pipe("a photo of a horse", num_inference_steps=steps, guidance_scale=DEFAULT_GUIDANCE_SCALE,
             generator=torch.Generator(device).manual_seed(i), output_type="pt")
        _sync(device)
        if i:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--latency-calls", type=int, default=10)
    parser.add_argument("--settings", default="dpmpp:20,ddim:50")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--reference-limit", type=int, default=None, help="CIFAR-10 test images for the Frechet distance")
    parser.add_argument("--smoke", action="store_true", help="CPU, 10 prompts, 4 and 6 steps, 500 reference images")
    parser.add_argument("--out", default="out/encprop")
    args = parser.parse_args()
    if args.smoke:
        torch.set_num_threads(1)
        args.device, args.dtype, args.n, args.batch_size, args.latency_calls = "cpu", "float32", 10, 10, 1
        args.settings, args.reference_limit = "dpmpp:4,ddim:6", 500
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pipe = load_embedded_pipeline(device=args.device, dtype=getattr(torch, args.dtype))
    base_scheduler = pipe.scheduler
    classifier = load_classifier(device=args.device)
    reference_features = classifier_outputs(classifier, load_cifar10("test", limit=args.reference_limit)[0])[1]
    prompts, labels = cifar_prompts(args.n)
    meta = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "dtype": args.dtype, "n": args.n, "batch_size": args.batch_size, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "seed": 0, "torch": torch.__version__}
    rows = []
    for setting in args.settings.split(","):
        sampler, steps = setting.split(":")
        steps = int(steps)
        if sampler == "ddim":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(base_scheduler.config)
        else:
            pipe.scheduler = base_scheduler
        baseline = None
        for name, config in configs(steps).items():
            if config is not None:
                accel.accelerate(pipe, AccelConfig(cache=config))
            try:
                images, seconds = generate(pipe, prompts, num_inference_steps=steps, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                                           seed=0, batch_size=args.batch_size)
                latency = single_image_latency(pipe, steps, args.latency_calls)
            finally:
                if config is not None:
                    accel.restore(pipe)
            predicted, features = classifier_outputs(classifier, images)
            row = {"sampler": sampler, "steps": steps, "config": name, "accel_config": repr(config),
                   "encoder_calls": steps if config is None else len(key_steps(steps, config)),
                   "seconds_1000": round(seconds * 1000 / args.n, 3), "images_per_second": args.n / seconds,
                   "latency_1_image_s": latency, "adherence": (predicted == labels).double().mean().item(),
                   "frechet_distance": frechet_distance(features, reference_features)}
            if baseline is None:
                baseline = images, row
            else:
                values = psnr(images.float() / 255, baseline[0].float() / 255)
                finite = values[torch.isfinite(values)]
                row.update(psnr_db=finite.mean().item() if finite.numel() else math.inf,
                           ssim=ssim(images.float() / 255, baseline[0].float() / 255).mean().item(),
                           adherence_drop_points=100 * (baseline[1]["adherence"] - row["adherence"]),
                           speedup_batch=baseline[1]["seconds_1000"] / row["seconds_1000"],
                           speedup_latency=baseline[1]["latency_1_image_s"] / latency)
            rows.append(row)
            _write(out, dict(meta, elapsed_s=round(time.time() - start, 1)), rows)
            print(f"[encprop] {sampler}-{steps} {name}: {row['images_per_second']:.1f} img/s, 1 image {1000 * latency:.1f} ms, "
                  f"PSNR {row.get('psnr_db', math.inf):.2f} dB, adherence {row['adherence']:.3f}, "
                  f"FD {row['frechet_distance']:.2f} ({time.time() - start:.0f} s)", flush=True)
    print((out / "encprop_quality.md").read_text())
    return 0


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "encprop_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    def f(row, key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    lines = [
        f"Encoder propagation on the embedded model, {meta['n']} CIFAR-10 prompts, guidance {meta['guidance_scale']}, "
        f"{meta['device']} {meta['dtype']}, batch {meta['batch_size']} (images/s) and batch 1 (latency).",
        "",
        "| sampler | config | encoder calls | images/s | speed-up | 1 image (ms) | speed-up | PSNR (dB) | SSIM | adherence | drop (points) | FD |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [f"{r['sampler']}-{r['steps']}", r["config"], f"{r['encoder_calls']}/{r['steps']}", f(r, "images_per_second", ".1f"),
                 f(r, "speedup_batch", ".2f"), f"{1000 * r['latency_1_image_s']:.1f}", f(r, "speedup_latency", ".2f"),
                 f(r, "psnr_db", ".2f"), f(r, "ssim", ".4f"), f"{r['adherence']:.3f}", f(r, "adherence_drop_points", "+.1f"),
                 f"{r['frechet_distance']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s)"]
    (out / "encprop_quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
