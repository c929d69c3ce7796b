"""Multi-GPU inference for one image: patch parallelism (DistriFusion), CFG parallelism, and on DiTs with a
diffusers context-parallel plan (Flux, Flux 2, QwenImage, Wan, LTX) Ulysses / ring attention (`ContextParallelConfig`).

    torchrun --nproc-per-node 2 my_script.py       # or: accelerate launch --num_processes 2 my_script.py

    from accel.parallel import PatchParallelConfig, init_distributed
    rank, world, device = init_distributed()      # the launcher's process group: NCCL on GPUs, gloo on CPU
    pipe = accel.accelerate(pipe.to(device), accel.AccelConfig(parallel=PatchParallelConfig(mode="patch")))
    image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(0)).images[0]   # same seed on every rank
"""

from .comm import CommManager, init_distributed
from .context import ContextParallel, ContextParallelConfig
from .layers import LAYER_WRAPPERS, PatchConv2d, PatchGroupNorm, PatchSelfAttention
from .patch import (MODES, PatchParallel, PatchParallelConfig, apply_patch_parallel, get_patch_parallel,
                    remove_patch_parallel, split_rows)

__all__ = [
    "CommManager",
    "ContextParallel",
    "ContextParallelConfig",
    "LAYER_WRAPPERS",
    "MODES",
    "PatchConv2d",
    "PatchGroupNorm",
    "PatchParallel",
    "PatchParallelConfig",
    "PatchSelfAttention",
    "apply_patch_parallel",
    "get_patch_parallel",
    "init_distributed",
    "remove_patch_parallel",
    "split_rows",
]
