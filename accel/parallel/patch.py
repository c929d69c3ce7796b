"""Patch parallelism for UNets (DistriFusion, Li et al., CVPR 2024) and CFG parallelism.

One image on several GPUs. A hook on the UNet gives each rank a band of the latent's rows (its
*patch*) and all-gathers the output rows, so every rank ends each step with the whole output and
runs the scheduler on identical latents. Inside the UNet, wrapped layers (`layers.py`) exchange
what a band needs from the others through one comm manager (`comm.py`): conv halos, GroupNorm
statistics, self-attention keys and values.

- Bands are cut in units of 2**(number of downsamplers) latent rows, so every level's rows stay
  aligned; units are shared as evenly as the world size allows, the first ranks taking one more,
  and a height that is not a whole number of units leaves the last band short. Any world size
  works as long as every rank gets at least one unit.
- Synchronous calls exchange fresh data and equal the single-process result; `sync=True` makes
  every step synchronous. Otherwise the first `warmup_steps` steps of every pipeline call are
  synchronous (the first always is: nothing is stale yet), and later steps use the other patches'
  data of the previous step while this step's is sent in the background (displaced patch
  parallelism), which hides the communication behind compute.
- `partial_conditioning` (PCPP, Zhang et al., 2024, "Partially Conditioned Patch Parallelism"):
  self-attention sees only that fraction of each adjacent patch's rows, nearest the boundary,
  which cuts the key/value traffic by the same fraction.
- ControlNet / T2I-Adapter residuals passed to the UNet are cut to each band's rows at their level
  (the ControlNet itself runs on the whole latent on every rank).
- CFG parallelism: the pipeline calls the UNet with the batch [uncond; cond]; two rank groups each
  compute one half and the halves are all-gathered, so the pipeline's guidance combine is
  unchanged. An odd batch is computed whole by both groups. "patch+cfg" on 2P ranks is 2 groups of
  P patches (needs an even world size of at least 4). Mode "cfg" also splits a DiT's batch (SD3,
  PixArt; Flux-dev has no CFG batch); the patch modes split UNet feature maps only.

Composes with CUDA graphs (`RuntimeConfig(cuda_graph=True)`): each call's host-side choices (its comm
slot, synchronous or asynchronous) are its decision in the session's plan of the call, made before the
graph hook runs, which keys its graphs on them, so a synchronous and an asynchronous step replay
different graphs, and a slot's first call (which registers its exchanges with a host sync) runs
eagerly. The collectives are captured in the graphs; see `comm.py`. torch.compile of the UNet is
refused (`accel.registry`'s conflicts): its compiled regions would contain the exchanges.

The launcher creates the process group (NCCL on GPUs, gloo on CPU) and `group` picks one (default:
the WORLD group); sub-groups of "patch+cfg" are created here, collectively, and destroyed on remove.
Every rank must use the same seed. Without torch.distributed (one process) everything is a
pass-through, so the single-process path and `restore` run anywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from ..errors import UnsupportedPipelineError, check_choice
from ..pipelines import denoiser, denoiser_kind
from ..session import technique_functions
from .comm import CommManager, _all_gather_flat
from .layers import unwrap_layers, wrap_layers

MODES = ("patch", "cfg", "patch+cfg")
NAME = "patch_parallel"
HOOK_NAME = f"accel.{NAME}"
COMPILE_REFUSED = ("patch/CFG parallelism over several processes does not compose with torch.compile of the denoiser "
                    "(UNet or DiT transformer: its compiled regions would contain the exchanges); use "
                    "RuntimeConfig(cuda_graph=True) without compile for the denoiser (CUDA graphs compose), or compile "
                    "only components=('vae',)")
_CONTROL_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                      "down_intrablock_additional_residuals")


@dataclass(frozen=True)
class PatchParallelConfig:
    """mode: "patch" (rows split over every rank), "cfg" (the CFG batch split over 2 ranks) or
        "patch+cfg" (2 CFG groups of world/2 patches).
    warmup_steps: synchronous steps at the start of every pipeline call before the asynchronous
        (one step stale) exchange starts; the first step is always synchronous.
    sync: every step synchronous: the output equals one process's (up to float rounding).
    partial_conditioning: None (attend to the whole image) or a fraction in (0, 1] of each
        adjacent patch's rows that self-attention sees (PCPP).
    group: the torch.distributed process group to run on; None is the launcher's WORLD group.
    """

    mode: str = "patch"
    warmup_steps: int = 4
    sync: bool = False
    partial_conditioning: float | None = None
    group: object = None

    def __post_init__(self):
        check_choice("PatchParallelConfig.mode", self.mode, MODES)
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"PatchParallelConfig.warmup_steps={self.warmup_steps!r} is not supported; valid: an int >= 0")
        if not isinstance(self.sync, bool):
            raise ValueError(f"PatchParallelConfig.sync={self.sync!r} is not supported; valid choices: True, False")
        fraction = self.partial_conditioning
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ValueError(f"PatchParallelConfig.partial_conditioning={fraction!r} is not supported; valid: None "
                                 "or a fraction in (0, 1] of each neighbouring patch's rows")
            if self.mode == "cfg":
                raise ValueError("PatchParallelConfig.partial_conditioning needs a patch mode ('patch' or 'patch+cfg'); "
                                 "mode 'cfg' exchanges no patches")
        if self.group is not None and not (dist.is_available() and isinstance(self.group, dist.ProcessGroup)):
            raise ValueError(f"PatchParallelConfig.group={self.group!r} is not supported; valid: None (the WORLD "
                             "group) or a torch.distributed ProcessGroup")


def world_size(config: PatchParallelConfig) -> int:
    """The number of processes `config` runs on here (1 without an initialised torch.distributed)."""
    return PatchParallel._resolve_group(config)[2]


def num_downsamplers(unet) -> int:
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def split_rows(height: int, unit: int, parts: int, pixels_per_row: int | None = None) -> list[tuple[int, int]]:
    """The [start, end) latent rows of each of `parts` bands: whole units, the first bands one more."""
    units = math.ceil(height / unit)
    if units < parts:
        smallest = (parts - 1) * unit + 1
        px = "" if pixels_per_row is None else f" ({height * pixels_per_row} px)"
        smallest_px = "" if pixels_per_row is None else f" ({math.ceil(smallest * pixels_per_row / 8) * 8} px)"
        raise ValueError(
            f"patch parallelism cannot split a latent {height} rows high{px} over {parts} patches: bands are cut in "
            f"units of {unit} latent rows (2 ** the UNet's downsamplers) and every patch needs at least one unit; "
            f"the smallest accepted height at world size {parts} is {smallest} latent rows{smallest_px}"
        )
    base, extra = divmod(units, parts)
    bands, start = [], 0
    for index in range(parts):
        end = min(height, start + (base + (index < extra)) * unit)
        bands.append((start, end))
        start = end
    return bands


class PatchParallel:
    """The applied state on one pipeline: groups, comm manager, wrapped layers, the UNet hook."""

    def __init__(self, pipe, config: PatchParallelConfig, session):
        if "context_parallel" in session.state:  # one `parallel` slot in AccelConfig; apply_patch_parallel could add one
            raise ValueError("patch / CFG parallelism cannot run beside context parallelism (both split the work over "
                             "the same processes); restore the pipeline first")
        self.config = config
        self.unet = denoiser(pipe)  # a UNet, or in mode "cfg" a DiT transformer
        if "patch" in config.mode and denoiser_kind(pipe) != "unet":
            raise UnsupportedPipelineError(f"PatchParallelConfig(mode={config.mode!r}) splits UNet feature maps into "
                                           f"bands; {type(pipe).__name__} has a DiT transformer: use mode='cfg'")
        self.session = session
        self.vae_scale_factor = getattr(pipe, "vae_scale_factor", None)
        self.group, self.rank, self.world = self._resolve_group(config)
        self.cfg_groups, self.patches = self._layout(config.mode, self.world)
        self.cfg_index, self.patch_index = divmod(self.rank, self.patches)
        self.unit = 2 ** num_downsamplers(self.unet) if "patch" in config.mode else 1
        self.comm: CommManager | None = None
        self.records: list = []
        self.created_groups: list = []
        self.calls = 0  # split UNet calls, and the bytes each rank sent gathering their outputs
        self.output_bytes = 0
        self._local: tuple[int, int] = (0, 0)
        self._bands: tuple[int, list] = (-1, [])  # (latent height, its bands), cut once per call
        self.planner = None  # the session's planner of the UNet, where this rank splits calls
        self.apply()

    # ---- set-up -----------------------------------------------------------------------------

    @staticmethod
    def _resolve_group(config):
        if not (dist.is_available() and dist.is_initialized()):
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if launched > 1 or config.group is not None:
                raise RuntimeError(
                    f"patch parallelism was asked for under a launcher (WORLD_SIZE={launched}) but torch.distributed "
                    "is not initialized; call torch.distributed.init_process_group ('nccl' on GPUs, 'gloo' on CPU) "
                    "or accel.parallel.init_distributed() before accelerate"
                )
            return None, 0, 1
        group = config.group if config.group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("PatchParallelConfig.group does not contain this process")
        return group, rank, dist.get_world_size(group)

    @staticmethod
    def _layout(mode: str, world: int) -> tuple[int, int]:
        """(CFG groups, patches per group) for `mode` on `world` ranks."""
        if world == 1:
            return 1, 1
        if mode == "patch":
            return 1, world
        if mode == "cfg":
            if world != 2:
                raise ValueError(f"mode 'cfg' splits the CFG batch over 2 processes, but the world size is {world}; "
                                 "use 'patch+cfg' (an even world size >= 4) or 'patch' (any world size)")
            return 2, 1
        if world % 2 or world < 4:
            raise ValueError(f"mode 'patch+cfg' needs an even world size of at least 4 (2 CFG groups x >= 2 patches), "
                             f"but the world size is {world}; use 'cfg' (2 processes) or 'patch' (any world size)")
        return 2, world // 2

    def apply(self) -> None:
        unet = self.unet
        if "patch" in self.config.mode and not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
            raise UnsupportedPipelineError(f"patch parallelism needs a UNet with down and up blocks, got {type(unet).__name__}")
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        if HOOK_NAME in registry.hooks:
            raise RuntimeError("patch parallelism is already applied to this UNet")
        try:
            if "patch" in self.config.mode:
                self.records = wrap_layers(unet, self)
            if self.patches > 1:
                patch_group = self.group
                if self.cfg_groups > 1:
                    ranks = dist.get_process_group_ranks(self.group)
                    for index in range(self.cfg_groups):  # every rank creates every group, in order
                        created = dist.new_group(ranks[index * self.patches:(index + 1) * self.patches])
                        self.created_groups.append(created)
                        if index == self.cfg_index:
                            patch_group = created
                self.comm = CommManager(patch_group, self.patch_index, self.patches)
            registry.register_hook(PatchParallelHook(self), HOOK_NAME)
            if self.world > 1:
                self.planner = self.session.planner(unet)
                self.planner.add_decider(NAME, self.plan)
        except BaseException:
            self.remove()
            raise
        self.session.add_call_listener(self._on_call)

    def remove(self) -> None:
        registry = getattr(self.unet, "_diffusers_hook", None)
        if registry is not None and HOOK_NAME in registry.hooks:
            registry.remove_hook(HOOK_NAME, recurse=False)
        if self.planner is not None:
            self.planner.remove_decider(NAME)
            self.planner = None
        self.session.remove_call_listener(self._on_call)
        unwrap_layers(self.records)
        self.records = []
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        for group in self.created_groups:
            dist.destroy_process_group(group)
        self.created_groups = []

    def _on_call(self, session) -> None:
        if self.comm is not None:
            self.comm.reset()

    # ---- a UNet call ------------------------------------------------------------------------

    def token_width(self, tokens: int) -> int:
        """The width of the feature map at the level where this band has `tokens` tokens."""
        rows, width = self._local
        for _ in range(num_downsamplers(self.unet) + 1):
            if rows * width == tokens:
                return width
            rows, width = math.ceil(rows / 2), math.ceil(width / 2)
        raise RuntimeError(f"patch parallelism: no level of a {self._local} band has {tokens} tokens")

    def bands(self, height: int) -> list[tuple[int, int]]:
        """This call's bands of latent rows (cut once per latent height)."""
        if self._bands[0] != height:
            self._bands = (height, split_rows(height, self.unit, self.patches, self.vae_scale_factor))
        return self._bands[1]

    def plan(self, call):
        """The host-side plan of this UNet call, made once per call even when a CUDA graph replays it: its comm
        slot and whether the exchange is fresh or stale; the decision the session records (and keys graphs on)."""
        sample = call.sample
        if not isinstance(sample, torch.Tensor) or (self.patches > 1 and sample.dim() != 4):
            return None  # forward raises the clear error
        self.calls += 1
        batch = sample.shape[0]
        decision: object = "whole"
        if self.patches == 1:  # the CFG halves only: the output is as large as this rank's half of the sample
            self.output_bytes += sample.numel() // (2 if self.cfg_groups > 1 and batch % 2 == 0 else 1) * sample.element_size()
            return decision
        _, channels, height, width = sample.shape
        if self.patches > 1:
            bands = self.bands(height)
            # Outside a pipeline's steps (or once they stop advancing): synchronous, on a throw-away slot.
            slot = call.slot if call.step is not None else None
            asynchronous = slot is not None and not self.config.sync and call.step >= self.config.warmup_steps
            fresh, laid_out = self.comm.prepare(slot, asynchronous)
            if laid_out:
                decision = ("fresh" if fresh else "stale", slot)
            else:
                decision = "registering"
                call.run_eagerly()  # its exchanges register with a host sync
            self.comm.join_each_call = call.graphed
        groups = 2 if self.cfg_groups > 1 and batch % 2 == 0 else 1
        rows = max(end - start for start, end in bands)
        out_channels = getattr(self.unet.config, "out_channels", channels)
        self.output_bytes += batch // groups * out_channels * rows * width * sample.element_size()
        return decision

    def forward(self, forward, args, kwargs):
        if self.world == 1:
            return forward(*args, **kwargs)
        arguments = dict(self.planner.arguments(args, kwargs))
        sample = arguments[self.planner.names[0]]
        batch = sample.shape[0]
        split_batch = self.cfg_groups > 1 and batch % 2 == 0
        if split_batch:
            half, start = batch // 2, self.cfg_index * (batch // 2)
            arguments = {name: pytree.tree_map(lambda x: _batch_slice(x, batch, start, half), value)
                         for name, value in arguments.items()}
        if self.patches == 1:
            return self._gather_halves(forward(**arguments), 2 if split_batch else 1)
        height = sample.shape[2]
        if self.patches > 1:
            bands = self.bands(height)
            start, end = bands[self.patch_index]
            arguments["sample"] = arguments["sample"][:, :, start:end]
            for name in _CONTROL_RESIDUALS:  # ControlNet / T2I-Adapter residuals: this band's rows at each level
                if arguments.get(name) is not None:
                    arguments[name] = pytree.tree_map(lambda r: _band_of(r, height, start, end, name), arguments[name])
            self._local = (end - start, sample.shape[3])
            self.comm.begin_call()
            try:
                output = forward(**arguments)
            finally:
                self.comm.end_call()
        else:
            output = forward(**arguments)
        return self._gather_output(output, bands, 2 if split_batch else 1)

    def _gather_halves(self, output, batch_groups: int):
        """Mode "cfg": every rank's output (its CFG half, or the whole batch when it was odd), concatenated."""
        local = (output[0] if isinstance(output, tuple) else output.sample).contiguous()
        if batch_groups == 1:
            return output
        gathered = torch.empty(self.world * local.numel(), dtype=local.dtype, device=local.device)
        _all_gather_flat(gathered, local.view(-1), self.group)
        full = gathered.view(self.world, *local.shape).flatten(0, 1)
        return (full,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=full)

    def _gather_output(self, output, bands, batch_groups: int):
        local = output[0] if isinstance(output, tuple) else output.sample
        most = max(end - start for start, end in bands)
        rows = local.shape[2]
        padded = local if rows == most else torch.cat(
            [local, local.new_zeros(*local.shape[:2], most - rows, *local.shape[3:])], dim=2)
        padded = padded.contiguous()
        gathered = torch.empty(self.world * padded.numel(), dtype=padded.dtype, device=padded.device)
        _all_gather_flat(gathered, padded.view(-1), self.group)
        gathered = gathered.view(self.world, *padded.shape)
        full = torch.cat([
            torch.cat([gathered[c * self.patches + p][:, :, :end - start] for p, (start, end) in enumerate(bands)], dim=2)
            for c in range(batch_groups)
        ], dim=0)
        if isinstance(output, tuple):
            return (full,) + tuple(output[1:])
        return type(output)(sample=full)


class PatchParallelHook(ModelHook):
    """Split each UNet call over the ranks and gather its output (see `PatchParallel.forward`)."""

    def __init__(self, plan: PatchParallel):
        super().__init__()
        self.plan = plan

    def new_forward(self, module, *args, **kwargs):
        return self.plan.forward(self.fn_ref.original_forward, args, kwargs)


def _band_of(residual, height: int, start: int, end: int, name: str):
    """Rows [start, end) of the latent, at the resolution of `residual` (a feature map 2**k times smaller)."""
    if not isinstance(residual, torch.Tensor):
        return residual
    rows = residual.shape[-2]
    factor = 2 ** round(math.log2(max(1, height / rows)))
    if math.ceil(height / factor) != rows or start % factor:
        raise UnsupportedPipelineError(f"patch parallelism: a {name} tensor has {rows} rows, which is not the latent's "
                                       f"{height} rows at a power-of-two scale; it cannot be split into bands")
    return residual[..., start // factor:math.ceil(end / factor), :]


def _batch_slice(x, batch: int, start: int, size: int):
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch:
        return x[start:start + size]
    return x


# ---- the technique ------------------------------------------------------------------------------


# Without AccelConfig, on an accelerated pipeline; `get_patch_parallel(pipe)` has `.comm.read_stats()` (bytes,
# collectives, wait time), `.output_bytes` and the ranks.
apply_patch_parallel, remove_patch_parallel, get_patch_parallel = technique_functions(NAME, PatchParallel)
