"""Command-line arguments shared by the `accel` CLI and the programs that also run alone
(`python -m apps.batch_generate`, `python -m apps.gradio_app`), so that those need not import the CLI."""

from __future__ import annotations

import argparse

GUIDANCE_HELP = ("classifier-free guidance scale, >= 0; at 1 or below, guidance is off "
                 "(default: 4 on the embedded model, else 7.5)")
SEED_HELP = "0 to 2**64 - 1, the seeds torch.Generator takes (default: 0)"
SIZE_HELP = ("pixels, a multiple of 8 (of the VAE factor times the patch size on a DiT, e.g. 16 on SD3); "
             "default: the model's")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers folder or Hub id, or mini-sd3-cifar10 for the embedded DiT "
                   "(default: the embedded CIFAR-10 model)")
    p.add_argument("--preset", default=None, help="acceleration preset (see `accel presets`; on a CPU without its "
                   "torch.compile and CUDA graphs); default: none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="load weights in this dtype")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """`accel batch`."""
    p.epilog = ("exit status: 1 if any item of the run failed (the others still complete; manifest.jsonl says which "
                "and why, and a re-run retries those only), else 0")
    p.add_argument("prompts", help="prompt file: text (one per line), .jsonl or .csv (see apps/batch_generate.py)")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="folder for the images and manifest.jsonl")
    p.add_argument("--format", default=None, choices=["txt", "jsonl", "csv"], help="default: from the file extension")
    p.add_argument("--batch-size", type=int, default=1, help="items of equal settings per pipeline call, >= 1")
    p.add_argument("--seed", type=int, default=0, help="item i gets seed + i unless it sets its own; " + SEED_HELP)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps, >= 1 (default: 20 on the embedded model, else the preset's or pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    p.add_argument("--height", type=int, default=None, help=SIZE_HELP)
    p.add_argument("--width", type=int, default=None, help=SIZE_HELP)
    add_allow_large(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_allow_large(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-large", action="store_true", help="allow a height or width over 4x the model's own "
                   "(128 px on the embedded model): minutes per step on a CPU, and off what the model learned")


def add_app_arguments(p: argparse.ArgumentParser) -> None:
    """`accel app`."""
    p.add_argument("--model", default=None, help="diffusers folder or Hub id, chosen at start (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--results", default=None, help="benchmark JSON folder for the plot (default: benchmarks/results)")
