"""Block-pruned UNets (BK-SDM, LAPTOP-Diff): configs plus weight maps from the teacher.

    student, key_map = pruning.bk_sdm_unet(pipe.unet, "small")
    student, info = pruning.laptop_unet(pipe.unet, calibration, ratio=0.4)
    pruning.save_unet(student, "out/unet-small", report)      # save_pretrained + pruning_report.json
    student = pruning.load_unet("out/unet-small")             # either kind, safetensors only
"""

from __future__ import annotations

from pathlib import Path

from accel.model_swap import load_unet_folder

from .bk_sdm import BK_SDM_VARIANTS, bk_sdm_config, bk_sdm_key_map, bk_sdm_unet, copy_teacher_weights
from .laptop import (
    LAPTOP_TARGETS,
    PrunedUNet2DConditionModel,
    blocks_removed,
    calibration_inputs,
    laptop_scores,
    laptop_unet,
    removable_candidates,
    select_blocks,
)
from .report import count_macs, count_parameters, example_inputs, measure_latency, pruning_report, write_pruning_report

METHODS = tuple(f"bk-{v}" for v in BK_SDM_VARIANTS) + ("laptop",)

__all__ = [
    "BK_SDM_VARIANTS", "LAPTOP_TARGETS", "METHODS", "PrunedUNet2DConditionModel", "bk_sdm_config", "bk_sdm_key_map",
    "bk_sdm_unet", "blocks_removed", "calibration_inputs", "copy_teacher_weights", "count_macs", "count_parameters", "example_inputs",
    "laptop_scores", "laptop_unet", "load_unet", "measure_latency", "pruning_report", "removable_candidates",
    "save_unet", "select_blocks", "write_pruning_report",
]


def save_unet(unet, out_dir, report: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) and, given one, the pruning report beside it."""
    out_dir = Path(out_dir)
    unet.save_pretrained(out_dir, safe_serialization=True)
    if report is not None:
        write_pruning_report(report, out_dir)
    return out_dir


def load_unet(path, **kwargs):
    """Load a saved UNet folder, plain or pruned, by the class its config names (safetensors weights only)."""
    return load_unet_folder(path, (PrunedUNet2DConditionModel,), **kwargs)
