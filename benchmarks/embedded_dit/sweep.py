"""The quality harness on the embedded DiT at several guidance scales and scheduler shifts, in one process.

    python benchmarks/embedded_dit/sweep.py --model accel/models/mini-sd3-cifar10 --guidance 3 4 5 --shift 1 2 \
        --n 1000 --steps 28 --batch-size 250 --device cuda --out out/dit-sweep

Each setting is what `accel eval --model <folder> --n N --steps S --guidance G` measures (``accel.quality.evaluate``:
1,000 prompts "a photo of a {class}", 100 per class, seeds 0..999, adherence and Frechet distance in the
project classifier's features against the CIFAR-10 test set), with the scheduler swapped for
``FlowMatchEulerDiscreteScheduler.from_config(config, shift=s)``. One process loads the pipeline, the classifier
and the test set once. Writes ``<out>/shift{s}-g{g}/eval.{json,md}`` per setting and ``<out>/sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini-sd3-cifar10", help="the DiT's name or a pipeline folder")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 4.0, 5.0])
    parser.add_argument("--shift", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classifier", default=None, help="default: the shipped accel/models/cifar10-classifier")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from accel.embedded_dit import resolve_model
    from accel.quality.cifar import load_cifar10
    from accel.quality.classifier import load_classifier
    from accel.quality.evaluate import evaluate, write_report

    pipe = DiffusionPipeline.from_pretrained(resolve_model(args.model), local_files_only=True).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(args.classifier, device=pipe.device)
    reference = load_cifar10("test")[0]
    config = pipe.scheduler.config
    rows, start = [], time.time()
    for shift in args.shift:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
        for guidance in args.guidance:
            result = evaluate(pipe, n=args.n, num_inference_steps=args.steps, guidance_scale=guidance,
                              batch_size=args.batch_size, classifier=classifier, reference_images=reference)
            write_report(result, args.out / f"shift{shift:g}-g{guidance:g}")
            rows.append({"shift": shift, "guidance": guidance, **result["baseline"]})
            print(f"[sweep] shift {shift:g}, guidance {guidance:g}: adherence {rows[-1]['adherence']:.3f}, "
                  f"Frechet distance {rows[-1]['frechet_distance']:.2f}", flush=True)
    meta = {k: v for k, v in result.items() if k not in ("baseline", "guidance_scale")}
    meta.update(command="python " + " ".join(sys.argv), elapsed_s=round(time.time() - start, 1))
    (args.out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"{meta['n']} images ({meta['n'] // 10} per class), FlowMatch Euler {meta['num_inference_steps']} steps, seed "
        f"{meta['seed']}, {meta['device']} {meta['dtype']}; real-vs-real Frechet floor "
        f"{meta.get('real_vs_real_frechet_distance', float('nan')):.2f}",
        "",
        "| shift | guidance | prompt adherence | Frechet distance | s / image |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['shift']:g} | {r['guidance']:g} | {r['adherence']:.1%} | {r['frechet_distance']:.2f} | "
              f"{r['seconds_per_image']:.5f} |" for r in rows]
    lines += ["", f"Command: `{meta['command']}`"]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
