"""What pruning saved: parameters, multiply-accumulates and measured UNet latency, teacher against student.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (half its FLOP count), per module as well as in
total, so that a pruning criterion can price each block; latency is the median of CUDA-synchronised forward
passes on the UNet's own device.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def example_inputs(unet, batch_size: int = 1, *, seed: int = 0, sample_size: int | None = None) -> dict:
    """Random UNet keyword inputs (sample, timestep, text states and SDXL's added conditions) on its device."""
    config = unet.config
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator("cpu").manual_seed(seed)
    size = sample_size or config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    cross_dim = config.cross_attention_dim
    cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim

    def randn(*shape):
        return torch.randn(shape, generator=generator, device="cpu").to(device, dtype)

    inputs = {
        "sample": randn(batch_size, config.in_channels, *size),
        "timestep": torch.full((batch_size,), 500, device=device),
        "encoder_hidden_states": randn(batch_size, 77, cross_dim),
    }
    if config.addition_embed_type == "text_time":
        time_ids = 6  # SDXL's original size, crop offset and target size, each embedded separately
        pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch_size, pooled), "time_ids": randn(batch_size, time_ids)}
    return inputs


@torch.no_grad()
def count_macs(unet, inputs: dict, *, per_module: bool = False):
    """Multiply-accumulates of one forward pass; with ``per_module``, also ``{module path: MACs}``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        unet(**inputs)
    total = counter.get_total_flops() // 2
    if not per_module:
        return total
    root = type(unet).__name__ + "."
    modules = {name[len(root):]: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items() if name.startswith(root)}
    return total, modules


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(unet, inputs: dict, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of one UNet forward pass, synchronised on CUDA."""
    return measure_latencies([unet], inputs, warmup=warmup, repeats=repeats)[0]


@torch.no_grad()
def measure_latencies(unets, inputs: dict, *, warmup: int = 3, repeats: int = 20) -> list[float]:
    """Median seconds of one forward pass of each of `unets`, timed in turn (one pass each per round), so that a host
    whose speed drifts (another process, CPU frequency) slows every UNet alike instead of whichever ran then."""
    for _ in range(warmup):
        for unet in unets:
            unet(**inputs)
    times = [[] for _ in unets]
    for _ in range(repeats):
        for unet, samples in zip(unets, times):
            _synchronize(unet.device)
            start = time.perf_counter()
            unet(**inputs)
            _synchronize(unet.device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def pruning_report(teacher, student, *, method: str, removed_blocks=(), inputs: dict | None = None,
                   latency: bool = True, warmup: int = 3, repeats: int = 20, extra: dict | None = None) -> dict:
    """Params, MACs and (optionally) latency of both UNets on the same inputs, and their ratios."""
    inputs = inputs if inputs is not None else example_inputs(teacher)
    report = {
        "method": method,
        "removed_blocks": list(removed_blocks),
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student),
        "teacher_macs": count_macs(teacher, inputs),
        "student_macs": count_macs(student, inputs),
        "input_shape": list(inputs["sample"].shape),
        "device": str(teacher.device),
        "dtype": str(teacher.dtype).replace("torch.", ""),
    }
    report["params_ratio"] = report["student_params"] / report["teacher_params"]
    report["macs_ratio"] = report["student_macs"] / report["teacher_macs"]
    if latency:
        report["teacher_latency_s"], report["student_latency_s"] = measure_latencies(
            [teacher, student], inputs, warmup=warmup, repeats=repeats)
        report["latency_ratio"] = report["student_latency_s"] / report["teacher_latency_s"]
    report.update(extra or {})
    return report


def write_pruning_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``pruning_report.json`` and a short ``pruning_report.md`` beside the saved student."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "pruning_report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Pruned UNet: {report['method']}",
        "",
        "| | teacher | student | ratio |",
        "| --- | --- | --- | --- |",
        f"| parameters | {report['teacher_params']:,} | {report['student_params']:,} | {report['params_ratio']:.3f} |",
        f"| MACs per step ({'x'.join(map(str, report['input_shape']))}) | {report['teacher_macs']:,} | {report['student_macs']:,} | {report['macs_ratio']:.3f} |",
    ]
    if "latency_ratio" in report:
        lines.append(f"| UNet latency (s, {report['device']} {report['dtype']}) | {report['teacher_latency_s']:.5f} | "
                     f"{report['student_latency_s']:.5f} | {report['latency_ratio']:.3f} |")
    if report["removed_blocks"]:
        lines += ["", "Removed blocks: " + ", ".join(f"`{b}`" for b in report["removed_blocks"]) + "."]
    md_path = out_dir / "pruning_report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
