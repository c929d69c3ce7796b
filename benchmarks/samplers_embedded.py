"""Sampler x steps table on the embedded model: PSNR of each sampler's images to a 200-step
reference (DPM-Solver++ 3M, Karras) from the same seed and prompts, ours next to diffusers'
schedulers in the same run.

    python benchmarks/samplers_embedded.py --per-class 2 --out benchmarks/results/samplers-embedded
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from accel.embedded import CIFAR10_CLASSES, load_embedded_pipeline
from samplers.evaluate import DEFAULT_STEPS, format_table, sampler_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=2, help="prompts per CIFAR-10 class")
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)))
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/samplers-embedded")
    args = parser.parse_args()
    pipe = load_embedded_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a {c}" for c in CIFAR10_CLASSES for _ in range(args.per_class)]
    start = time.time()
    rows = sampler_table(pipe, steps=[int(s) for s in args.steps.split(",")], reference_steps=args.reference_steps,
                         prompt=prompts, guidance_scale=args.guidance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    meta = {"prompts": len(prompts), "guidance": args.guidance, "device": args.device,
            "reference": f"dpmpp_3m karras {args.reference_steps} steps", "elapsed_s": round(time.time() - start, 1),
            "command": command}
    (out / "samplers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "samplers.md").write_text(
        f"PSNR (dB) to a {meta['reference']} reference, embedded model, {len(prompts)} prompts, "
        f"guidance {args.guidance}, seed 0, {args.device}.\n\n" + format_table(rows) + f"\n\nCommand: `{command}`\n"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
