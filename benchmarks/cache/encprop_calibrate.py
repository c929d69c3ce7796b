"""Calibrate encoder propagation's default key-step rule on the embedded model (CPU is enough).

    nice -n 10 python benchmarks/cache/encprop_calibrate.py --n 100 --settings dpmpp-20 --out benchmarks/results/encoder-propagation

For each sampler setting (DPM-Solver++ 20 steps, DDIM 50 steps; guidance 4) the script generates the
CIFAR-10 prompts once without caching, then once per candidate key-step rule with the same seeds, and
records the PSNR to the uncached images, the classifier's prompt adherence and how many encoder calls
the rule skips. Candidates are `EncoderPropagationConfig` rules; "paper" is the paper's DDIM-50 key set
scaled to the step count (the previous default). Results are written after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import accel
from accel import AccelConfig, EncoderPropagationConfig
from accel.cache import key_steps
from accel.cache.faster_diffusion import paper_key_steps
from accel.embedded import load_embedded_pipeline
from accel.quality.classifier import load_classifier
from accel.quality.evaluate import DEFAULT_GUIDANCE_SCALE, cifar_prompts, classifier_outputs, generate
from accel.quality.metrics import psnr

SETTINGS = {"dpmpp-20": ("dpmpp", 20), "ddim-50": ("ddim", 50)}


def candidate_config(name: str, num_steps: int) -> EncoderPropagationConfig:
    """"paper", or "interval=I[,dense=F]": the key_interval / dense_fraction rule."""
    if name == "paper":
        return EncoderPropagationConfig(key_steps=paper_key_steps(num_steps))
    fields = dict(item.split("=") for item in name.split(","))
    unknown = set(fields) - {"interval", "dense"}
    if unknown:
        raise ValueError(f"candidate {name!r}: unknown fields {sorted(unknown)}; valid: 'paper' or 'interval=I[,dense=F]'")
    return EncoderPropagationConfig(key_interval=int(fields["interval"]), dense_fraction=float(fields.get("dense", 0.0)))


def set_sampler(pipe, sampler: str, base_scheduler):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(base_scheduler.config) if sampler == "ddim" else base_scheduler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--candidates", default="paper;interval=2;interval=3",
                        help="';'-separated: 'paper' or 'interval=I[,dense=F]'")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/encoder-propagation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pipe = load_embedded_pipeline(device="cpu")
    base_scheduler = pipe.scheduler
    classifier = load_classifier(device="cpu")
    prompts, labels = cifar_prompts(args.n)
    meta = {"command": "python " + " ".join(sys.argv), "device": "cpu (float32, 1 thread)", "n": args.n,
            "guidance_scale": DEFAULT_GUIDANCE_SCALE, "seed": 0, "model": "accel/models/mini-sd-cifar10"}
    rows = []
    for setting in args.settings.split(","):
        sampler, steps = SETTINGS[setting]
        set_sampler(pipe, sampler, base_scheduler)
        options = dict(num_inference_steps=steps, guidance_scale=DEFAULT_GUIDANCE_SCALE, seed=0,
                       batch_size=args.batch_size, warmup=False)
        baseline, seconds = generate(pipe, prompts, **options)
        base_adherence = (classifier_outputs(classifier, baseline)[0] == labels).double().mean().item()
        rows.append({"setting": setting, "candidate": "uncached", "key_steps": list(range(steps)),
                     "adherence": base_adherence, "seconds": round(seconds, 1)})
        _write(out, meta, rows, start)
        for name in args.candidates.split(";"):
            config = candidate_config(name, steps)
            keys = sorted(key_steps(steps, config))
            accel.accelerate(pipe, AccelConfig(cache=config))
            try:
                images, seconds = generate(pipe, prompts, **options)
            finally:
                accel.restore(pipe)
            values = psnr(images.float() / 255, baseline.float() / 255)
            finite = values[torch.isfinite(values)]
            adherence = (classifier_outputs(classifier, images)[0] == labels).double().mean().item()
            rows.append({"setting": setting, "candidate": name, "key_steps": keys,
                         "skipped_encoder_calls": steps - len(keys),
                         "psnr_db": finite.mean().item() if finite.numel() else math.inf, "adherence": adherence,
                         "adherence_drop_points": round(100 * (base_adherence - adherence), 2), "seconds": round(seconds, 1)})
            _write(out, meta, rows, start)
            print(f"[calibrate] {setting} {name}: {len(keys)} key steps, PSNR {rows[-1]['psnr_db']:.2f} dB, "
                  f"adherence {adherence:.3f} (uncached {base_adherence:.3f})", flush=True)
    return 0


def _write(out: Path, meta: dict, rows: list[dict], start: float) -> None:
    meta = dict(meta, elapsed_s=round(time.time() - start, 1))
    (out / "calibration.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Encoder propagation key-step calibration, embedded model, {meta['n']} CIFAR-10 prompts "
        f"({meta['n'] // 10} per class), guidance {meta['guidance_scale']}, seed {meta['seed']}, {meta['device']}. "
        "CPU numbers: PSNR is to the uncached images of the same run; adherence is the CIFAR-10 classifier's.",
        "",
        "| setting | candidate | key steps | encoder calls skipped | PSNR to uncached (dB) | adherence | adherence drop (points) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        psnr_text = f"{r['psnr_db']:.2f}" if "psnr_db" in r else "-"
        drop = f"{r['adherence_drop_points']:+.1f}" if "adherence_drop_points" in r else "-"
        keys = ", ".join(map(str, r["key_steps"])) if r["candidate"] != "uncached" else "all"
        lines.append(f"| {r['setting']} | {r['candidate']} | {keys} | {r.get('skipped_encoder_calls', 0)} | {psnr_text} | "
                     f"{r['adherence']:.3f} | {drop} |")
    lines += ["", f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s)"]
    (out / "calibration.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
