"""The quality harness: what an acceleration costs in fidelity, prompt adherence and Frechet distance.

``evaluate(pipe, preset=...)`` generates the same prompts with the same per-image seeds twice, first
unaccelerated (the baseline), then under ``accel.accelerate(pipe, config, preset=preset)``, and
reports latency, PSNR / SSIM of the accelerated images to the baseline and, where the pipeline makes
32x32 CIFAR-10 images, prompt adherence (share classified as the prompted class by the project's
classifier) and the Frechet distance, in that classifier's features, to the CIFAR-10 test set, next to
the floor of 1,000 real test images against the other 9,000.

    accel eval --n 1000 --device cuda --out out/eval      # the command line (apps/cli.py)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .cifar import CIFAR10_CLASSES
from .frechet import frechet_distance
from .metrics import psnr, ssim

# The embedded model's guidance scale: best Frechet distance of 2, 3, 4, 6 at 20 steps (model card).
DEFAULT_GUIDANCE_SCALE = 4.0
REAL_FLOOR_SIZE = 1000


def cifar_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    """``n`` prompts "a photo of a(n) {class}", ``n / 10`` per class in class order, and their labels."""
    from ..embedded import eval_prompt

    labels = torch.arange(n) * len(CIFAR10_CLASSES) // n
    return [eval_prompt(CIFAR10_CLASSES[label]) for label in labels.tolist()], labels


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    *,
    num_inference_steps: int | None,
    guidance_scale: float,
    seed: int,
    batch_size: int,
    warmup: bool = True,
) -> tuple[torch.Tensor, float]:
    """Images as uint8 ``(N, 3, H, W)`` on the CPU and the seconds spent in the pipeline calls.

    Image ``i`` always uses a generator seeded with ``seed + i``, whatever the batch size.
    ``num_inference_steps=None`` leaves the step count to the pipeline (an accelerated
    pipeline's sampler config sets it).
    """
    steps = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    device = pipe._execution_device
    generator_device = "cpu" if device.type == "mps" else device

    def call(index: range):
        generators = [torch.Generator(generator_device).manual_seed(seed + i) for i in index]
        return pipe(
            [prompts[i] for i in index],
            **steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        ).images

    if warmup:  # kernels, compilation and caches out of the timing
        call(range(min(batch_size, len(prompts))))
    images, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        _synchronize(device)
        tic = time.perf_counter()
        batch = call(range(start, min(start + batch_size, len(prompts))))
        _synchronize(device)
        seconds += time.perf_counter() - tic
        images.append((batch.float().clamp(0, 1) * 255).round().to("cpu", torch.uint8))
    return torch.cat(images), seconds


@torch.no_grad()
def classifier_outputs(classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels and penultimate features of uint8 images, on the classifier's device."""
    device = next(classifier.parameters()).device
    labels, features = [], []
    for chunk in images.split(batch_size):
        x = chunk.to(device).float() / 255
        f = classifier.features(x)
        features.append(f.double().cpu())
        labels.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(labels), torch.cat(features)


def real_frechet_floor(reference_features: torch.Tensor, size: int = REAL_FLOOR_SIZE, seed: int = 0) -> float:
    """Frechet distance of ``size`` real images against the rest of the reference set (a fixed random split)."""
    order = torch.randperm(reference_features.shape[0], generator=torch.Generator().manual_seed(seed))
    return frechet_distance(reference_features[order[:size]], reference_features[order[size:]])


def _summary(images: torch.Tensor, seconds: float, labels, classifier, reference_features) -> dict:
    summary = {
        "seconds": round(seconds, 4),
        "seconds_per_image": seconds / images.shape[0],
        "images_per_second": images.shape[0] / seconds if seconds > 0 else math.inf,
    }
    if classifier is not None:
        predicted, features = classifier_outputs(classifier, images)
        if labels is not None:
            summary["adherence"] = (predicted == labels).double().mean().item()
            summary["adherence_per_class"] = {
                name: (predicted[labels == k] == k).double().mean().item() for k, name in enumerate(CIFAR10_CLASSES) if (labels == k).any()
            }
        summary["frechet_distance"] = frechet_distance(features, reference_features)
    return summary


def evaluate(
    pipe,
    *,
    config=None,
    preset: str | None = None,
    n: int = 1000,
    num_inference_steps: int = 20,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 100,
    prompts: list[str] | None = None,
    classifier=None,
    reference_images: torch.Tensor | None = None,
    return_images: bool = False,
    baseline: dict | None = None,
) -> dict:
    """Baseline, then (given ``config`` or ``preset``) accelerated generation of the same prompts and seeds.

    ``prompts`` default to ``n`` CIFAR-10 prompts ("a photo of a {class}", ``n // 10`` per class).
    For 32x32 outputs the CIFAR-10 ``classifier`` (default: the shipped one) gives adherence (CIFAR
    prompts only) and the Frechet distance to ``reference_images`` (uint8, default: the CIFAR-10 test
    set). Returns a dict for ``write_report`` (with the uint8 baseline images under ``"images"`` if
    ``return_images``); the pipeline is restored before it returns. ``baseline``: an earlier result
    of the same settings with ``return_images=True``, whose baseline images are reused instead of
    generated again (several configs against one baseline).
    """
    labels = None
    if prompts is None:
        prompts, labels = cifar_prompts(n)
    else:
        prompts = list(prompts)[:n] if len(prompts) >= n else [prompts[i % len(prompts)] for i in range(n)]
    options = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)

    if baseline is not None:
        if baseline["n"] != len(prompts) or any(baseline[k] != v for k, v in options.items()):
            raise ValueError("the reused baseline was generated with other settings (n, steps, guidance, seed, batch)")
        baseline_images, baseline_seconds = baseline["images"]["baseline"], baseline["baseline"]["seconds"]
    else:
        baseline_images, baseline_seconds = generate(pipe, prompts, **options)
    cifar_domain = tuple(baseline_images.shape[-2:]) == (32, 32)
    reference_features = None
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)  # a UNet, or a DiT
    result = {
        "model": str(getattr(pipe, "name_or_path", "") or type(pipe).__name__),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(pipe._execution_device),
        "dtype": str(denoiser.dtype).replace("torch.", "") if denoiser is not None else None,
        "preset": preset,
        "config": repr(config) if config is not None else None,
        "n": len(prompts),
        **options,
        "image_size": list(baseline_images.shape[-2:]),
    }
    if cifar_domain:
        from .classifier import load_classifier

        classifier = classifier if classifier is not None else load_classifier(device=pipe._execution_device)
        if reference_images is None:
            from .cifar import load_cifar10

            reference_images = load_cifar10("test")[0]
        reference_features = classifier_outputs(classifier, reference_images)[1]
        if reference_features.shape[0] > REAL_FLOOR_SIZE + 1:
            result["real_vs_real_frechet_distance"] = real_frechet_floor(reference_features)
            result["real_vs_real_sizes"] = [REAL_FLOOR_SIZE, reference_features.shape[0] - REAL_FLOOR_SIZE]
    else:
        classifier = None
    result["baseline"] = _summary(baseline_images, baseline_seconds, labels, classifier, reference_features)

    if config is not None or preset is not None:
        import accel

        accel.accelerate(pipe, config, preset=preset)
        sampler = accel.resolve_config(config, preset).sampler
        # A sampler config with its own step count is part of the trade-off being measured.
        accel_options = dict(options, num_inference_steps=None) if getattr(sampler, "num_steps", None) else options
        try:
            images, seconds = generate(pipe, prompts, **accel_options)
        finally:
            accel.restore(pipe)
        accelerated = _summary(images, seconds, labels, classifier, reference_features)
        image_psnr = psnr(images.float() / 255, baseline_images.float() / 255)
        finite = image_psnr[torch.isfinite(image_psnr)]
        accelerated["speedup"] = baseline_seconds / seconds if seconds > 0 else math.inf
        # Identical images have infinite PSNR: average the others and count these apart.
        accelerated["psnr_db"] = finite.mean().item() if finite.numel() else math.inf
        accelerated["identical_images"] = int((~torch.isfinite(image_psnr)).sum())
        accelerated["ssim"] = ssim(images.float() / 255, baseline_images.float() / 255).mean().item()
        result["accelerated"] = accelerated
    if return_images:
        result["images"] = {"baseline": baseline_images}
        if result.get("accelerated"):
            result["images"]["accelerated"] = images
    return result


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def write_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` (every number) and ``eval.md`` (a table) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    serialisable = {k: v for k, v in result.items() if k != "images"}
    json_path = out_dir / "eval.json"
    json_path.write_text(json.dumps(serialisable, indent=2) + "\n")

    rows = [("baseline", result["baseline"])]
    if result.get("accelerated"):
        rows.append((result.get("preset") or "accelerated", result["accelerated"]))
    lines = [
        f"# Quality report: {result['model']}",
        "",
        f"{result['n']} images, {result['num_inference_steps']} steps, guidance {result['guidance_scale']}, "
        f"seed {result['seed']}, batch {result['batch_size']}, {result['scheduler']}, {result['device']} {result['dtype']}.",
        "",
        "| run | s / image | speed-up | PSNR to baseline (dB) | SSIM to baseline | adherence | Frechet distance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows:
        speedup = row.get("speedup", 1.0 if name == "baseline" else None)
        lines.append(
            f"| {name} | {_fmt(row['seconds_per_image'], 5)} | {_fmt(speedup, 2)} | {_fmt(row.get('psnr_db'), 2)} | "
            f"{_fmt(row.get('ssim'))} | {_fmt(row.get('adherence'))} | {_fmt(row.get('frechet_distance'), 2)} |"
        )
    if "real_vs_real_frechet_distance" in result:
        a, b = result["real_vs_real_sizes"]
        lines += ["", f"Frechet distance of {a} real CIFAR-10 test images against the other {b}: {result['real_vs_real_frechet_distance']:.2f}."]
    md_path = out_dir / "eval.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
