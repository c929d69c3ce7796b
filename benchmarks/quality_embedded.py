"""Quality cost of accelerations on the embedded model, against one unaccelerated baseline.

    python benchmarks/quality_embedded.py --n 1000 --device cpu --out benchmarks/results/embedded-quality

Baseline: DPM-Solver++ 20 steps, guidance 4 (the model's measured setting). Each config runs the
same prompts and seeds; the table gives PSNR/SSIM to the baseline images, prompt adherence and
Frechet distance (CIFAR-10 classifier features), and the speed-up on the device used. Results are
written after every config, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import accel
from accel import AccelConfig, DeepCacheConfig, EncoderPropagationConfig, SamplerConfig
from accel.embedded import load_embedded_pipeline
from accel.quality.evaluate import evaluate

CONFIGS = {
    "deepcache-i3": AccelConfig(cache=DeepCacheConfig(cache_interval=3)),
    "fast-sampler (dpmpp_2m karras 12)": AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=12, schedule="karras")),
    "encoder-propagation": AccelConfig(cache=EncoderPropagationConfig()),
    "deepcache-i2": AccelConfig(cache=DeepCacheConfig(cache_interval=2)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/embedded-quality")
    args = parser.parse_args()
    names = args.configs.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_embedded_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    base = evaluate(pipe, n=args.n, batch_size=args.batch_size, return_images=True)
    rows = [{"config": "baseline (dpmpp_2m 20 steps)", **base["baseline"]}]
    for name in names:
        result = evaluate(pipe, config=CONFIGS[name], n=args.n, batch_size=args.batch_size, baseline=base)
        rows.append({"config": name, "accel_config": repr(CONFIGS[name]), **result["accelerated"]})
        meta = {k: v for k, v in base.items() if k not in ("images", "baseline")}
        meta.update(command="python " + " ".join(sys.argv), elapsed_s=round(time.time() - start, 1))
        (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "quality.md").write_text(_table(meta, rows))
        print(f"[quality] {name}: adherence {rows[-1]['adherence']:.3f}, PSNR {rows[-1]['psnr_db']:.2f} dB", flush=True)
    return 0


def _table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Embedded model, {meta['n']} images ({meta['n'] // 10} per class), guidance {meta['guidance_scale']}, seed {meta['seed']}, "
        f"{meta['device']} {meta['dtype']}; real-vs-real Frechet floor {meta.get('real_vs_real_frechet_distance', float('nan')):.2f}",
        "",
        "| config | speed-up (this device) | PSNR to baseline (dB) | SSIM | adherence | Frechet distance |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        lines.append(f"| {r['config']} | {f('speedup', '.2f')} | {f('psnr_db', '.2f')} | {f('ssim', '.4f')} | "
                     f"{f('adherence', '.3f')} | {f('frechet_distance', '.2f')} |")
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
