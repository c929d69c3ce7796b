"""Sampler x steps accuracy table: PSNR of each sampler's image to a high-step reference from the
same seed and prompt, with diffusers' own schedulers run at the same settings in the same run.

The public function for `apps/` benchmarks; prompt adherence and Frechet distance come from the
quality harness on the images this returns.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import numpy as np
import torch

from .api import make_scheduler

# (label, sampler, schedule, options): ours next to diffusers' equivalent at the same settings
DEFAULT_CANDIDATES = (
    ("diffusers dpm++2m", "dpmpp_2m", "default", {"backend": "diffusers"}),
    ("diffusers unipc", "unipc_bh2", "default", {"backend": "diffusers"}),
    ("dpmpp_2m", "dpmpp_2m", "default", {}),
    ("dpmpp_3m", "dpmpp_3m", "default", {}),
    ("dpmpp_2m karras", "dpmpp_2m", "karras", {}),
    ("unipc_bh2 order 3", "unipc_bh2", "default", {"order": 3}),
    ("deis order 3", "deis", "default", {"order": 3}),
    ("ipndm", "ipndm", "default", {}),
)
DEFAULT_STEPS = (4, 5, 6, 8, 10, 15, 20)


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over a batch of images in [0, data_range]."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _run(pipe, scheduler, steps, seed, call_kwargs):
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(**call_kwargs, num_inference_steps=steps, output_type="np", generator=generator).images
    finally:
        pipe.scheduler = original


def sampler_table(
    pipe,
    *,
    candidates: Iterable[tuple[str, str, str, dict]] = DEFAULT_CANDIDATES,
    steps: Sequence[int] = DEFAULT_STEPS,
    reference: tuple[str, str, dict] = ("dpmpp_3m", "karras", {}),
    reference_steps: int = 200,
    seed: int = 0,
    keep_images: bool = False,
    **call_kwargs,
) -> list[dict]:
    """One row per (candidate, steps): label, sampler, schedule, steps, model calls, PSNR (dB) to
    the reference image and seconds; `call_kwargs` go to the pipeline (prompt or prompt_embeds,
    guidance_scale, height, width, ...). The pipeline's scheduler is restored afterwards."""
    base = pipe.scheduler
    ref_sampler, ref_schedule, ref_options = reference
    ref_images = _run(pipe, make_scheduler(ref_sampler, schedule=ref_schedule, base=base, **ref_options),
                      reference_steps, seed, call_kwargs)
    rows = []
    for label, sampler, schedule, options in candidates:
        for n in steps:
            scheduler = make_scheduler(sampler, schedule=schedule, base=base, **options)
            start = time.perf_counter()
            images = _run(pipe, scheduler, n, seed, call_kwargs)
            row = {
                "label": label,
                "sampler": sampler,
                "schedule": schedule,
                "options": {k: v for k, v in options.items() if k != "sigmas"},
                "steps": n,
                "model_calls": len(scheduler.timesteps),
                "psnr_db": psnr(images, ref_images),
                "seconds": time.perf_counter() - start,
            }
            if keep_images:
                row["images"] = images
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one line per candidate, one column of PSNR (dB) per step count."""
    steps = sorted({r["steps"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    psnrs = {(r["label"], r["steps"]): r["psnr_db"] for r in rows}
    lines = ["| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for label in labels:
        cells = [f"{psnrs[(label, n)]:.2f}" if (label, n) in psnrs else "" for n in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
