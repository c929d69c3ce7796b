"""BK-SDM: block-removed Stable Diffusion UNets (Kim et al., 2023, "BK-SDM: A Lightweight, Fast, and Cheap
Version of Stable Diffusion"), and SDXL pruned the same way as KOALA (Lee et al., 2023).

A student is a plain ``UNet2DConditionModel`` config derived from the teacher's plus a key map that names, for
every student weight, the teacher weight it starts from:

- ``base``: one resnet(+attention) layer per down stage instead of two, and two per up stage instead of three
  (the second pair is removed in both paths, as in the paper); diffusers ties an up stage to its down stage
  (``layers_per_block + 1`` layers), which keeps the skip connections consistent.
- ``small``: ``base`` without the mid block (``mid_block_type=None``).
- ``tiny``: ``small`` without the innermost stage (its down stage and the matching up stage).

``max_transformer_depth`` additionally keeps only the first transformer blocks of every attention layer, as
KOALA does in SDXL's deepest stage (10 -> 6 or 5). The student saves with ``save_pretrained`` and loads with
``UNet2DConditionModel.from_pretrained``.
"""

from __future__ import annotations

import re

import torch

from accel.errors import check_choice

BK_SDM_VARIANTS = ("base", "small", "tiny")

# Config entries that hold one value per down stage (reversed for the up stages by diffusers).
_PER_STAGE_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention",
                   "transformer_layers_per_block", "layers_per_block")


def _per_stage(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def bk_sdm_config(teacher_config, variant: str, *, max_transformer_depth: int | None = None) -> dict:
    """The student's ``UNet2DConditionModel`` config for ``variant`` (``base``, ``small`` or ``tiny``)."""
    check_choice("variant", variant, BK_SDM_VARIANTS)
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    stages = len(down)
    if config.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError("asymmetric UNets (reverse_transformer_layers_per_block set) are not supported by BK-SDM pruning")
    if any(n < 1 for n in _per_stage(config["layers_per_block"], stages)):
        raise ValueError(f"layers_per_block must be >= 1 in every stage, got {config['layers_per_block']!r}")
    for key in _PER_STAGE_KEYS:
        if key in config and config[key] is not None:
            config[key] = _per_stage(config[key], stages)
    config["layers_per_block"] = [1] * stages
    if variant in ("small", "tiny"):
        config["mid_block_type"] = None
    if variant == "tiny":
        if stages < 2:
            raise ValueError("BK-SDM tiny removes the innermost stage; this UNet has only one stage")
        config["down_block_types"], config["up_block_types"] = down[:-1], up[1:]
        config["block_out_channels"] = list(config["block_out_channels"])[:-1]
        for key in _PER_STAGE_KEYS:
            if isinstance(config.get(key), list):
                config[key] = config[key][:-1]
    if max_transformer_depth is not None:
        if max_transformer_depth < 1:
            raise ValueError(f"max_transformer_depth must be >= 1 or None, got {max_transformer_depth}")
        config["transformer_layers_per_block"] = [min(d, max_transformer_depth) for d in config["transformer_layers_per_block"]]
    return config


def bk_sdm_key_map(teacher_config, student_config) -> dict[str, str]:
    """Student module prefix -> teacher module prefix, for the blocks whose names change.

    Stage ``i`` of the student's down path is the teacher's stage ``i``; its up stages are the teacher's last
    ones (``tiny`` drops the first). In a down stage the student keeps the teacher's first layer; in an up stage
    it keeps the first and the last layer (the last one reads the skip from the stage above and has the matching
    input channels). Attention layers keep their first transformer blocks. Modules not named here (conv_in,
    time embedding, conv_out, downsamplers, upsamplers...) keep their names.
    """
    t_down, s_down = teacher_config["down_block_types"], student_config["down_block_types"]
    t_layers = _per_stage(teacher_config["layers_per_block"], len(t_down))
    s_layers = _per_stage(student_config["layers_per_block"], len(s_down))
    up_offset = len(t_down) - len(s_down)
    mapping = {}
    for i in range(len(s_down)):
        for j in range(s_layers[i]):
            for kind in ("resnets", "attentions"):
                mapping[f"down_blocks.{i}.{kind}.{j}."] = f"down_blocks.{i}.{kind}.{j}."
        t_up, s_up = t_layers[::-1][i + up_offset] + 1, s_layers[::-1][i] + 1
        kept = list(range(s_up - 1)) + [t_up - 1]  # first layers, then the teacher's last
        for j, tj in enumerate(kept):
            for kind in ("resnets", "attentions"):
                mapping[f"up_blocks.{i}.{kind}.{j}."] = f"up_blocks.{i + up_offset}.{kind}.{tj}."
        mapping[f"up_blocks.{i}.upsamplers."] = f"up_blocks.{i + up_offset}.upsamplers."
    return mapping


def _teacher_key(student_key: str, prefix_map: dict[str, str]) -> str:
    for prefix in sorted(prefix_map, key=len, reverse=True):
        if student_key.startswith(prefix):
            return prefix_map[prefix] + student_key[len(prefix):]
    if re.match(r"(down|up)_blocks\.\d+\.(resnets|attentions)\.", student_key):
        raise KeyError(f"no teacher weight is mapped to {student_key}")
    return student_key


def full_key_map(student: torch.nn.Module, prefix_map: dict[str, str]) -> dict[str, str]:
    """Every student state-dict key -> the teacher key it copies (transformer blocks keep their indices)."""
    return {key: _teacher_key(key, prefix_map) for key in student.state_dict()}


@torch.no_grad()
def copy_teacher_weights(
    student: torch.nn.Module, teacher: torch.nn.Module, key_map: dict[str, str], *, may_differ: tuple[str, ...] = ()
) -> list[str]:
    """Copy every mapped teacher tensor into the student and return the keys left at their initialisation.

    A missing teacher key is an error; so is a shape mismatch, except under the prefixes in ``may_differ``.
    """
    teacher_state = teacher.state_dict()
    kept_init = []
    for s_key, s_tensor in student.state_dict().items():
        t_key = key_map[s_key]
        if t_key not in teacher_state:
            raise KeyError(f"student weight {s_key} maps to {t_key}, which the teacher does not have")
        if teacher_state[t_key].shape != s_tensor.shape:
            if s_key.startswith(may_differ):
                kept_init.append(s_key)
                continue
            raise ValueError(f"student {s_key} {tuple(s_tensor.shape)} != teacher {t_key} {tuple(teacher_state[t_key].shape)}")
        s_tensor.copy_(teacher_state[t_key])
    return kept_init


def bk_sdm_unet(teacher, variant: str, *, max_transformer_depth: int | None = None):
    """A BK-SDM student of ``teacher`` (a ``UNet2DConditionModel``) initialised from its weights.

    Returns ``(student, key_map)``: the student on the teacher's device and dtype, and the full map from each
    student state-dict key to the teacher key it was copied from. One case cannot copy everything: ``tiny`` on a
    UNet whose two innermost stages differ in width (SD1.x/2.x have 1280 and 1280, SDXL 640 and 1280) feeds the
    first up layer a narrower input than the teacher's, so that layer's input-side tensors keep their fresh
    initialisation; their keys are dropped from the returned map and KD retraining learns them.
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher, UNet2DConditionModel):
        raise TypeError(f"BK-SDM pruning needs a UNet2DConditionModel, got {type(teacher).__name__}")
    config = bk_sdm_config(teacher.config, variant, max_transformer_depth=max_transformer_depth)
    student = UNet2DConditionModel.from_config(config).to(teacher.device)
    if student.dtype != teacher.dtype:
        student.to(teacher.dtype)
    key_map = full_key_map(student, bk_sdm_key_map(teacher.config, student.config))
    may_differ = ("up_blocks.0.resnets.0.",) if variant == "tiny" else ()
    for key in copy_teacher_weights(student, teacher, key_map, may_differ=may_differ):
        del key_map[key]
    return student.eval(), key_map
