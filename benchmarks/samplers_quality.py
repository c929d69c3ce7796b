"""Sampler x steps on the embedded model with the whole quality harness: PSNR to a 200-step
reference from the same seeds, prompt adherence and Frechet distance (the CIFAR-10 classifier),
ours next to diffusers' schedulers at the same settings in the same run, and the tuned schedules
saved by `benchmarks/tuned_embedded.py` at their step counts.

    python benchmarks/samplers_quality.py --device cuda --n 1000 --out benchmarks/results/samplers-quality

`Judge` (the scores of one row) and `markdown_table` / `tuned_gains` (the report) serve
`benchmarks/flow_samplers.py` too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from accel.embedded import load_embedded_pipeline
from accel.quality.cifar import load_cifar10
from accel.quality.classifier import load_classifier
from accel.quality.evaluate import cifar_prompts, classifier_outputs, generate
from accel.quality.frechet import frechet_distance
from accel.quality.metrics import psnr
from samplers import make_scheduler
from samplers.evaluate import DEFAULT_CANDIDATES, DEFAULT_STEPS
from samplers.tuned import TunedSchedule

CANDIDATES = (*DEFAULT_CANDIDATES, ("unipc_bh2 order 2", "unipc_bh2", "default", {"order": 2}))


@dataclass
class Judge:
    """What a row is scored against: the reference images (uint8) from the same seeds and prompts, the
    prompts' labels, the CIFAR-10 classifier and its features of the CIFAR-10 test set (None for a model
    that does not make 32x32 CIFAR-10 images: PSNR only)."""

    reference: torch.Tensor
    labels: torch.Tensor
    classifier: torch.nn.Module | None
    reference_features: torch.Tensor | None

    def row(self, label: str, sampler: str, schedule: str, steps: int, images: torch.Tensor, seconds: float,
            options: dict | None = None, **extra) -> dict:
        """PSNR (dB, mean over images) to the reference, prompt adherence and Frechet distance of `images`."""
        values = psnr(images.float() / 255, self.reference.float() / 255)
        finite = values[torch.isfinite(values)]
        result = {"label": label, "sampler": sampler, "schedule": schedule, "options": options or {}, "steps": steps,
                  **extra, "psnr_db": finite.mean().item() if finite.numel() else math.inf,
                  "adherence": None, "frechet_distance": None, "seconds": round(seconds, 3)}
        scores = ""
        if self.classifier is not None:
            predicted, features = classifier_outputs(self.classifier, images)
            result["adherence"] = (predicted == self.labels).double().mean().item()
            result["frechet_distance"] = frechet_distance(features, self.reference_features)
            scores = f", adherence {result['adherence']:.3f}, FD {result['frechet_distance']:.2f}"
        print(f"{label:>22} {steps:>3} steps: PSNR {result['psnr_db']:.2f} dB{scores}", flush=True)
        return result


def markdown_table(rows: list[dict]) -> list[str]:
    """One line per label, one column per step count; each cell PSNR / adherence / Frechet distance (PSNR
    alone where the rows have no classifier scores)."""
    labels_order = list(dict.fromkeys(r["label"] for r in rows))
    all_steps = sorted({r["steps"] for r in rows})
    cell = {(r["label"], r["steps"]): r for r in rows}
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in all_steps) + " |", "|---|" + "---:|" * len(all_steps)]
    for label in labels_order:
        cells = []
        for s in all_steps:
            r = cell.get((label, s))
            if r is None:
                cells.append("")
            elif r["adherence"] is None:
                cells.append(f"{r['psnr_db']:.2f}")
            else:
                cells.append(f"{r['psnr_db']:.2f} / {r['adherence']:.1%} / {r['frechet_distance']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def tuned_gains(rows: list[dict]) -> list[str]:
    """Each tuned schedule against the default schedule of the same solver (olss: its base, 2M)."""
    gains = []
    for r in rows:
        solver = "dpmpp_2m" if r["sampler"] == "olss" else r["sampler"]
        same = [d for d in rows if d["schedule"] == "default" and d["sampler"] == solver
                and d["steps"] == r["steps"] and d["options"] == r["options"]]
        if r["schedule"] == "tuned" and same:
            gains.append(f"{r['label']} at {r['steps']} steps: {r['psnr_db'] - same[0]['psnr_db']:+.2f} dB "
                         f"over {same[0]['label']}")
    return ["", "Tuned against the default schedule: " + "; ".join(gains) + "."] if gains else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)))
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--tuned", default="benchmarks/results/tuned-embedded/schedules/tuned_schedules",
                        help="folder of tuned schedule JSON files (searched by benchmarks/tuned_embedded.py)")
    parser.add_argument("--candidates", default="",
                        help="labels of the candidates to run, comma-separated (default: all; 'none': tuned only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/samplers-quality")
    args = parser.parse_args()
    wanted = [c.strip() for c in args.candidates.split(",") if c.strip()]
    known = [c[0] for c in CANDIDATES]
    if any(c not in known and c != "none" for c in wanted):
        parser.error(f"--candidates {args.candidates!r}: valid choices are {known} or 'none'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_embedded_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler
    classifier = load_classifier(device=args.device)
    reference_features = classifier_outputs(classifier, load_cifar10("test")[0])[1]
    prompts, labels = cifar_prompts(args.n)
    options = dict(guidance_scale=args.guidance, seed=0, batch_size=args.batch_size)

    def run(scheduler, steps: int) -> tuple[torch.Tensor, float]:
        pipe.scheduler = scheduler
        try:
            return generate(pipe, prompts, num_inference_steps=steps, **options)
        finally:
            pipe.scheduler = base

    reference, _ = run(make_scheduler("dpmpp_3m", schedule="karras", base=base), args.reference_steps)
    row = Judge(reference, labels, classifier, reference_features).row

    rows = []
    steps_list = [int(s) for s in args.steps.split(",")]
    for label, sampler, schedule, extra in CANDIDATES:
        if wanted and label not in wanted:
            continue
        for steps in steps_list:
            images, seconds = run(make_scheduler(sampler, schedule=schedule, base=base, **extra), steps)
            rows.append(row(label, sampler, schedule, steps, images, seconds, extra))
    for path in sorted(Path(args.tuned).glob("*.json")) if Path(args.tuned).is_dir() else []:
        tuned = TunedSchedule.load(path)
        label = f"{tuned.sampler} tuned" + (f" order {tuned.sampler_options['order']}" if "order" in tuned.sampler_options else "")
        label += " + per-step orders" if tuned.orders else ""
        if tuned.coefficients is not None:  # OLSS: fitted coefficients, on searched or given sigmas
            label = f"{path.stem.rsplit('-', 1)[0]} (fitted coefficients)"
        # the searched options and per-step orders come with the schedule
        scheduler = make_scheduler(tuned.sampler, schedule="tuned", tuned=str(path), base=base)
        images, seconds = run(scheduler, tuned.num_steps)
        rows.append(row(label, tuned.sampler, "tuned", tuned.num_steps, images, seconds, tuned.sampler_options))

    command = "python " + " ".join(sys.argv)
    meta = {"n": args.n, "guidance": args.guidance, "device": args.device, "command": command,
            "reference": f"dpmpp_3m karras {args.reference_steps} steps", "elapsed_s": round(time.perf_counter() - start, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "reference_adherence": row("reference", "dpmpp_3m", "karras", args.reference_steps, reference, 0.0)}
    (out / "samplers-quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Embedded model, {args.n} CIFAR-10 prompts (seeds 0..{args.n - 1}), guidance {args.guidance}, "
             f"{meta['gpu'] or args.device}. Each cell: PSNR (dB) to a {meta['reference']} reference from the same "
             f"seeds / prompt adherence / Frechet distance. The reference itself: adherence "
             f"{meta['reference_adherence']['adherence']:.1%}, Frechet {meta['reference_adherence']['frechet_distance']:.2f}.",
             "", *markdown_table(rows), *tuned_gains(rows)]
    lines += ["", f"Command: `{command}`"]
    (out / "samplers-quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
