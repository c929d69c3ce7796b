"""LAPTOP-Diff one-shot layer pruning (Zhang et al., 2024, "LAPTOP-Diff: Layer Pruning and Normalized
Distillation for Compressing Diffusion Models").

Every removable layer of a UNet - a resnet, an attention (transformer) layer, or a resnet+attention pair - is
scored once by the output loss its removal causes: the mean squared change of the UNet's prediction on
calibration inputs spread over the timesteps. The paper finds this loss nearly additive over layers, so the set
to remove is the one with the least summed score that reaches the target saving (parameters, MACs or measured
latency): a multiple-choice 0-1 knapsack (at most one option per layer), solved exactly by dynamic programming
over a quantised saving.

A removed layer becomes the identity on its main input: residual layers whose output has the width of their
input (all attention layers, down- and mid-block resnets without a channel change, up-block resnets whose
hidden input already has the output width - these drop their skip connection). The skip connections other
layers consume are unchanged, so any selection runs. Such a UNet is not a plain diffusers config: it is a
``PrunedUNet2DConditionModel``, a ``UNet2DConditionModel`` whose config adds ``removed_blocks``; it saves with
``save_pretrained`` and loads with ``PrunedUNet2DConditionModel.from_pretrained`` (or ``pruning.load_unet``).
A ``DiffusionPipeline.from_pretrained`` of a folder holding it does not know the class: load the pipeline's
teacher and swap the UNet in (``accel.UNetSwapConfig(path=..., loader=pruning.load_unet)``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from accel.errors import check_choice

LAPTOP_TARGETS = ("params", "macs", "latency")


class SkippedResnet(torch.nn.Module):
    """A removed resnet: passes its main input through (an up-block resnet's skip half is dropped)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, hidden_states, temb=None, *args, **kwargs):
        return hidden_states[:, : self.out_channels]


class SkippedAttention(torch.nn.Module):
    """A removed transformer layer: the identity, returned the way ``Transformer2DModel`` returns."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


@dataclass(frozen=True)
class Candidate:
    """One way to prune one layer: ``kind`` is ``resnet``, ``attention`` or ``pair``; candidates with the same
    ``layer`` exclude each other."""

    name: str
    kind: str
    layer: str
    modules: tuple[str, ...]


def _main_input_channels(unet, path: str, resnet) -> int:
    """Width of a resnet's input without the concatenated skip connection."""
    if not path.startswith("up_blocks."):
        return resnet.in_channels
    _, index, _, layer = path.split(".")
    channels = list(reversed(unet.config.block_out_channels))
    i, j = int(index), int(layer)
    return (channels[max(i - 1, 0)] if j == 0 else channels[i])


def removable_candidates(unet) -> list[Candidate]:
    """Every layer that can be removed, alone and (where a block has both) as a resnet+attention pair."""
    removed = set(getattr(unet.config, "removed_blocks", None) or ())
    candidates = []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in blocks:
        resnets = list(getattr(block, "resnets", []))
        attentions = list(getattr(block, "attentions", None) or [])
        # Down and up blocks pair resnet j with attention j; the mid block pairs attention j with resnet j + 1.
        offset = 1 if prefix == "mid_block" else 0
        for j, resnet in enumerate(resnets):
            path = f"{prefix}.resnets.{j}"
            ok = path not in removed and _main_input_channels(unet, path, resnet) == resnet.out_channels
            attn_path = f"{prefix}.attentions.{j - offset}" if 0 <= j - offset < len(attentions) else None
            attn_ok = attn_path is not None and attn_path not in removed
            layer = f"{prefix}.{j}"
            if ok:
                candidates.append(Candidate(path, "resnet", layer, (path,)))
            if attn_ok:
                candidates.append(Candidate(attn_path, "attention", layer, (attn_path,)))
            if ok and attn_ok:
                candidates.append(Candidate(f"{attn_path}+resnets.{j}", "pair", layer, (path, attn_path)))
    return candidates


def _stand_in(module: torch.nn.Module) -> torch.nn.Module:
    return SkippedResnet(module.out_channels) if hasattr(module, "out_channels") and hasattr(module, "conv1") else SkippedAttention()


def _replace(unet, path: str, module: torch.nn.Module) -> torch.nn.Module:
    parent_path, _, index = path.rpartition(".")
    parent = unet.get_submodule(parent_path)
    old = parent[int(index)]
    parent[int(index)] = module
    return old


def remove_blocks(unet, paths) -> None:
    """Replace the modules at ``paths`` (``down_blocks.0.attentions.1`` ...) by identity stand-ins, in place."""
    for path in paths:
        module = unet.get_submodule(path)
        if isinstance(module, (SkippedResnet, SkippedAttention)):
            raise ValueError(f"{path} is already removed")
        _replace(unet, path, _stand_in(module))


@contextlib.contextmanager
def blocks_removed(unet, paths):
    """Run with the modules at ``paths`` removed; the very same modules are put back on exit."""
    originals = {}
    try:
        for path in paths:
            originals[path] = _replace(unet, path, _stand_in(unet.get_submodule(path)))
        yield unet
    finally:
        for path, module in originals.items():
            _replace(unet, path, module)


class PrunedUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` with some layers removed (``removed_blocks`` in its config)."""

    def __init__(self, removed_blocks: list[str] | tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.register_to_config(removed_blocks=list(removed_blocks))
        remove_blocks(self, removed_blocks)


# diffusers reads a config class's init keys from its signature: the parent's, plus ``removed_blocks``.
_parent_parameters = [p for p in inspect.signature(UNet2DConditionModel.__init__).parameters.values() if p.name != "self"]
PrunedUNet2DConditionModel.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("removed_blocks", inspect.Parameter.KEYWORD_ONLY, default=())]
    + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _parent_parameters]
)


def _output(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0].float()


@torch.no_grad()
def laptop_scores(unet, calibration: list[dict], candidates: list[Candidate] | None = None, *,
                  disable: bool | None = None) -> list[tuple[Candidate, float]]:
    """Each candidate's output loss: mean squared change of the UNet output when it alone is removed, relative to
    the output's mean square, averaged over the calibration inputs. Sorted from most to least harmful.
    A progress bar counts the candidates (`disable`: tqdm's; None shows it on a terminal only)."""
    from tqdm.auto import tqdm

    if not calibration:
        raise ValueError("laptop_scores needs at least one calibration input")
    if unet.config.addition_embed_type is not None and any("added_cond_kwargs" not in x for x in calibration):
        raise ValueError(f"the UNet has addition_embed_type={unet.config.addition_embed_type!r} (SDXL) and every "
                         "calibration input needs added_cond_kwargs (pooled text embeds and time ids); build them with "
                         "calibration_inputs(unet, encode_conditioning(pipe, prompts, unconditional=False), ...)")
    candidates = removable_candidates(unet) if candidates is None else candidates
    references = [_output(unet, inputs) for inputs in calibration]
    scores = []
    for candidate in tqdm(candidates, desc="LAPTOP: scoring blocks", unit="block", disable=disable, leave=False):
        with blocks_removed(unet, candidate.modules):
            loss = [(_output(unet, x) - ref).square().mean() / ref.square().mean() for x, ref in zip(calibration, references)]
        scores.append((candidate, torch.stack(loss).mean().item()))
    return sorted(scores, key=lambda item: -item[1])


def _module_latencies(unet, inputs: dict, paths: set[str], repeats: int) -> tuple[float, dict[str, float]]:
    """Median seconds of the whole forward and of each module in ``paths``, CUDA-synchronised around each."""
    device = unet.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    starts, samples = {}, {p: [] for p in paths}
    handles = []
    for path in paths:
        module = unet.get_submodule(path)

        def pre(_module, _args, path=path):
            sync(device)
            starts[path] = time.perf_counter()

        def post(_module, _args, _output, path=path):
            sync(device)
            samples[path].append(time.perf_counter() - starts[path])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    totals = []
    try:
        with torch.no_grad():
            _output(unet, inputs)  # warm-up
            for values in samples.values():
                values.clear()
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                _output(unet, inputs)
                sync(device)
                totals.append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(totals), {p: statistics.median(v) for p, v in samples.items()}


def candidate_costs(unet, candidates: list[Candidate], target: str, inputs: dict | None = None, *, repeats: int = 5):
    """``(total, {candidate name: saving})`` in parameters, MACs or seconds of one forward pass on ``inputs``."""
    check_choice("target", target, LAPTOP_TARGETS)
    paths = {p for c in candidates for p in c.modules}
    if target == "params":
        total = sum(p.numel() for p in unet.parameters())
        per_module = {p: sum(q.numel() for q in unet.get_submodule(p).parameters()) for p in paths}
    else:
        from .report import count_macs, example_inputs

        inputs = inputs if inputs is not None else example_inputs(unet)
        if target == "macs":
            total, macs = count_macs(unet, inputs, per_module=True)
            per_module = {p: macs.get(p, 0) for p in paths}
        else:
            total, per_module = _module_latencies(unet, inputs, paths, repeats)
    return total, {c.name: sum(per_module[p] for p in c.modules) for c in candidates}


def select_blocks(scores: list[tuple[Candidate, float]], costs: dict[str, float], amount: float, *, resolution: int = 2000) -> list[Candidate]:
    """The candidates with the least summed score whose savings reach ``amount``, at most one per layer.

    Exact over savings quantised to ``amount / resolution`` (rounded down, so the true saving is never less).
    """
    if amount <= 0:
        return []
    layers: dict[str, list[tuple[Candidate, float, int]]] = {}
    for candidate, score in scores:
        units = math.floor(costs[candidate.name] * resolution / amount + 1e-9)  # the epsilon absorbs float error
        layers.setdefault(candidate.layer, []).append((candidate, max(score, 0.0), units))
    best_possible = sum(max(costs[c.name] for c, _, _ in options) for options in layers.values())
    if best_possible < amount:
        raise ValueError(f"cannot remove {amount:.4g}: removing every removable layer saves at most {best_possible:.4g}")
    inf = float("inf")
    # cost[s]: least summed score reaching saving s (capped at resolution); choice[k][s]: what layer k took.
    cost = [0.0] + [inf] * resolution
    choices = []
    for options in layers.values():
        new_cost, choice = list(cost), [None] * (resolution + 1)
        for s, base in enumerate(cost):
            if base == inf:
                continue
            for index, (_, score, units) in enumerate(options):
                t = min(resolution, s + units)
                if base + score < new_cost[t]:
                    new_cost[t], choice[t] = base + score, (index, s)
        cost = new_cost
        choices.append(choice)
    if cost[resolution] == inf:
        raise ValueError(f"cannot remove {amount:.4g} at this resolution; lower the ratio")
    chosen, s = [], resolution
    for options, choice in zip(reversed(list(layers.values())), reversed(choices)):
        if choice[s] is not None:
            index, s = choice[s]
            chosen.append(options[index][0])
    return chosen[::-1]


def laptop_unet(teacher, calibration: list[dict], ratio: float, *, target: str = "params", cost_inputs: dict | None = None,
                disable: bool | None = None):
    """Prune ``ratio`` of ``teacher``'s parameters / MACs / latency by the LAPTOP-Diff criterion.

    Returns ``(student, info)``: a ``PrunedUNet2DConditionModel`` holding the teacher's remaining weights (same
    key names), and ``{"removed_blocks", "scores", "savings", "target", "ratio"}``.
    """
    check_choice("target", target, LAPTOP_TARGETS)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), the share of the UNet's {target} to remove; got {ratio}")
    if not isinstance(teacher, UNet2DConditionModel):
        raise TypeError(f"LAPTOP pruning needs a UNet2DConditionModel, got {type(teacher).__name__}")
    was_training = teacher.training
    teacher.eval()
    scores = laptop_scores(teacher, calibration, disable=disable)
    total, costs = candidate_costs(teacher, [c for c, _ in scores], target, cost_inputs)
    chosen = select_blocks(scores, costs, ratio * total)
    teacher.train(was_training)
    removed = sorted(p for c in chosen for p in c.modules)
    config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_") and k != "removed_blocks"}
    previously = list(getattr(teacher.config, "removed_blocks", None) or [])
    student = PrunedUNet2DConditionModel(removed_blocks=previously + removed, **config).to(teacher.device)
    if student.dtype != teacher.dtype:
        student.to(teacher.dtype)
    teacher_state = teacher.state_dict()
    student.load_state_dict({k: teacher_state[k] for k in student.state_dict()})
    info = {
        "target": target,
        "ratio": ratio,
        "removed_blocks": removed,
        "saved": sum(costs[c.name] for c in chosen) / total,
        "scores": {c.name: s for c, s in scores},
        "savings": {name: saving / total for name, saving in costs.items()},
    }
    return student.eval(), info


@torch.no_grad()
def calibration_inputs(unet, conditioning, scheduler_config, *, x0: torch.Tensor | None = None,
                       num_timesteps: int = 8, seed: int = 0) -> list[dict]:
    """One UNet input per timestep, evenly spread over training: ``x0`` (latents of real images, or standard
    normal noise when ``None``) noised to that timestep with the teacher's schedule, with the given conditioning.

    ``conditioning``: one row per calibration sample - an ``accel.conditioning.Conditioning``
    (``encode_conditioning(pipe, prompts, unconditional=False)``, SDXL's pooled text embeds and time ids
    included), or for SD 1.x/2.x a tensor of text states.
    """
    from diffusers import DDPMScheduler

    from accel.conditioning import as_conditioning, check_unet_conditioning

    conditioning = as_conditioning(conditioning)
    check_unet_conditioning(unet, conditioning)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    batch = len(conditioning)
    device, dtype = unet.device, unet.dtype
    cond = conditioning.to(device, dtype).unet_kwargs()
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    shape = (batch, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    x0 = torch.randn(shape, generator=generator) if x0 is None else x0.float().cpu()
    total = scheduler.config.num_train_timesteps
    inputs = []
    for k in range(num_timesteps):
        t = torch.full((batch,), int((k + 0.5) * total / num_timesteps))
        noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        inputs.append({"sample": noisy.to(device, dtype), "timestep": t.to(device), **cond})
    return inputs
