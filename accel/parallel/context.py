"""Context parallelism for DiT transformers through diffusers' own hooks: Ulysses attention (Jacobs et al., 2023,
"DeepSpeed Ulysses") and ring attention (Liu et al., 2023, "Ring Attention with Blockwise Transformers").

Every process holds the whole transformer and 1/N of the sequence. diffusers' context-parallel plan of the model
(its `_cp_plan`, or one given here) names where the tokens are split (the transformer's inputs) and gathered again
(its output layer), and its attention backends exchange what attention needs in between: Ulysses swaps the
sequence split for a head split with an all-to-all, ring attention passes every process's keys and values around
and combines the partial results by their log-sum-exp. Every rank ends each call with the whole output and steps
the scheduler on identical latents, like one process (within float rounding).

Nothing here reimplements those exchanges. On CUDA the model's `enable_parallelism` sets everything up. Elsewhere
(CPU with gloo) diffusers' `_resolve_parallel_config` divides by `torch.accelerator.device_count()`, which is 0, so
the same steps are taken here with a CPU device mesh: `ParallelConfig.setup`, the config on every attention
processor, `apply_context_parallel`. Removal undoes each of them (`remove_context_parallel`, the processors'
previous config and attention backend), so `restore` is exact.

What diffusers 0.42.1 can run on a CPU: Ulysses with the "native" (SDPA) backend. Ring attention needs a backend
that returns the log-sum-exp; "native" does not ("Native attention does not support return_lse=True") and those
that do ("_native_cudnn", "_native_flash", "flash", "sage", ...) are CUDA kernels, so ring attention is refused on
a backend without it, with that reason.

Without torch.distributed (one process) and with the degrees left to the world size, nothing is applied, so the
single-process path and `restore` run anywhere. Every rank must use the same seed.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import UnsupportedPipelineError, check_choice
from ..pipelines import denoiser

NAME = "context_parallel"
HOOK_NAME = f"accel.{NAME}.check"
# Context-parallel backends of diffusers whose forward refuses return_lse=True, which ring attention needs.
_BACKENDS_WITHOUT_LSE = ("native", "_native_npu")
# What context parallelism sets on each attention processor (the backend too when attention_backend is given).
_PROCESSOR_FIELDS = ("_parallel_config", "_attention_backend")


@dataclass(frozen=True)
class ContextParallelConfig:
    """Drives diffusers' `ContextParallelConfig` on the pipeline's transformer (not the same class: this one is
    frozen, checked against the pipeline before anything changes, and undone by `restore`).

    ulysses_degree: processes that split the attention heads (Ulysses); None: the world size / ring_degree.
    ring_degree: processes that pass keys and values around a ring (needs an attention backend that returns the
        log-sum-exp: a CUDA one). ring_degree * ulysses_degree must equal the world size; both > 1 is
        diffusers' unified (Ulysses inside ring) attention.
    attention_backend: None keeps the transformer's attention backend (which must support context parallelism);
        the name of one of diffusers' context-parallel backends ("native", "_native_cudnn", "flash", ...) sets it
        until `restore`.
    cp_plan: None uses the model's `_cp_plan`; a diffusers `ContextParallelModelPlan` (a dict of module name to
        `ContextParallelInput` / `ContextParallelOutput`) for a transformer that has none.
    """

    ulysses_degree: int | None = None
    ring_degree: int = 1
    attention_backend: str | None = None
    cp_plan: dict | None = None

    def __post_init__(self):
        for name, optional in (("ulysses_degree", True), ("ring_degree", False)):
            value = getattr(self, name)
            if not ((value is None and optional) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
                valid = "None (the world size / ring_degree) or an int >= 1" if optional else "an int >= 1"
                raise ValueError(f"ContextParallelConfig.{name}={value!r} is not supported; valid: {valid}")
        # The backends of diffusers that run context parallelism (their exchanges are written for them).
        check_choice("ContextParallelConfig.attention_backend", self.attention_backend, (None, *context_parallel_backends()))
        if self.cp_plan is not None and not (isinstance(self.cp_plan, dict) and self.cp_plan):
            raise ValueError(f"ContextParallelConfig.cp_plan={self.cp_plan!r} is not supported; valid: None (the "
                             "model's _cp_plan) or a non-empty dict of module name to ContextParallelInput / Output")


def context_parallel_backends() -> list[str]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return sorted(_AttentionBackendRegistry._supports_context_parallel)


@functools.cache
def models_with_a_plan() -> tuple[str, ...]:
    """The transformer classes of the installed diffusers that carry a context-parallel plan (imports them all)."""
    import diffusers.models.transformers as transformers

    return tuple(name for name in dir(transformers) if getattr(getattr(transformers, name, None), "_cp_plan", None))


def degrees(config: ContextParallelConfig) -> tuple[int, int]:
    """(ring, ulysses) degrees on this launch; (1, 1) where nothing is split (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        asked = config.ring_degree * (config.ulysses_degree or 1)
        if launched > 1 or asked > 1:
            raise RuntimeError(
                f"context parallelism over {max(launched, asked)} processes was asked for (WORLD_SIZE={launched}, "
                f"ring_degree={config.ring_degree}, ulysses_degree={config.ulysses_degree}) but torch.distributed is "
                "not initialized; call torch.distributed.init_process_group ('nccl' on GPUs, 'gloo' on CPU) or "
                "accel.parallel.init_distributed() before accelerate"
            )
        return 1, 1
    world = dist.get_world_size()
    ring = config.ring_degree
    if config.ulysses_degree is None and world % ring:
        raise ValueError(f"ContextParallelConfig(ring_degree={ring}) must divide the world size {world} (ulysses_degree="
                         "None takes the rest of it)")
    ulysses = config.ulysses_degree if config.ulysses_degree is not None else world // ring
    if ring * ulysses != world:
        raise ValueError(f"ContextParallelConfig(ring_degree={ring}, ulysses_degree={config.ulysses_degree}): "
                         f"ring_degree x ulysses_degree must equal the world size {world} (every process holds one "
                         f"part of the sequence), got {ring} x {ulysses} = {ring * ulysses}")
    return ring, ulysses


def world_size(config: ContextParallelConfig) -> int:
    ring, ulysses = degrees(config)
    return ring * ulysses


def _attention_processors(model) -> list:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    return [m.processor for m in model.modules()
            if isinstance(m, (Attention, MochiAttention, AttentionModuleMixin)) and getattr(m, "processor", None) is not None]


class ContextParallel:
    """The applied state on one pipeline: diffusers' parallel config and hooks on the transformer, what they replaced."""

    def __init__(self, pipe, config: ContextParallelConfig, session):
        self.config = config
        self.model = denoiser(pipe)
        self.ring, self.ulysses = degrees(config)
        self.parallel_config = None
        self.plan = None
        self.saved: list = []  # (processor, its own _parallel_config / _attention_backend attributes) before
        if self.ring * self.ulysses > 1:
            self._check(pipe)
            self.apply()

    def _check(self, pipe) -> None:
        model = self.model
        self.plan = self.config.cp_plan if self.config.cp_plan is not None else getattr(model, "_cp_plan", None)
        if self.plan is None:
            raise UnsupportedPipelineError(
                f"context parallelism needs diffusers' context-parallel plan of the transformer; "
                f"{type(model).__name__} ({type(pipe).__name__}) has none: give ContextParallelConfig(cp_plan=...) or "
                f"use a model that has one: {', '.join(models_with_a_plan())}; for a CFG batch use "
                "PatchParallelConfig(mode='cfg')")
        if getattr(model, "_parallel_config", None) is not None:
            raise RuntimeError(f"this {type(model).__name__} already has diffusers parallelism (enable_parallelism or "
                               "from_pretrained(parallel_config=...)); accel cannot apply and undo it a second time")
        heads = getattr(model.config, "num_attention_heads", None)
        if self.ulysses > 1 and isinstance(heads, int) and heads % self.ulysses:
            raise ValueError(f"Ulysses attention splits the {heads} attention heads of {type(model).__name__} over "
                             f"ulysses_degree={self.ulysses} processes, which does not divide them; use a "
                             f"ulysses_degree dividing {heads} (and ring_degree for the rest of the world size)")
        processors = [p for p in _attention_processors(model) if hasattr(p, "_attention_backend")]
        if not processors:
            raise UnsupportedPipelineError(f"{type(model).__name__} has no attention processor that dispatches through "
                                           "diffusers' attention backends, which context parallelism runs in")
        backend = self.config.attention_backend or _backend_of(processors[0])
        if backend not in context_parallel_backends():
            raise ValueError(f"the attention backend {backend!r} of {type(model).__name__} does not support context "
                             f"parallelism; set ContextParallelConfig(attention_backend=...) to one that does: "
                             f"{', '.join(context_parallel_backends())}")
        if self.ring > 1 and backend in _BACKENDS_WITHOUT_LSE:
            raise ValueError(
                f"ring attention (ring_degree={self.ring}) combines each process's partial attention by its "
                f"log-sum-exp, which the {backend!r} backend does not return; set ContextParallelConfig("
                f"attention_backend=...) to one that does (CUDA: '_native_cudnn', '_native_flash', 'flash', 'sage'). "
                f"On a CPU diffusers has none: use ulysses_degree instead")

    def apply(self) -> None:
        from diffusers.hooks.context_parallel import apply_context_parallel
        from diffusers.models._modeling_parallel import ContextParallelConfig as DiffusersContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig

        model = self.model
        self.saved = [(p, {k: v for k, v in vars(p).items() if k in _PROCESSOR_FIELDS})
                      for p in _attention_processors(model) if hasattr(p, "_attention_backend")]
        cp = DiffusersContextParallelConfig(ring_degree=self.ring, ulysses_degree=self.ulysses)
        self.parallel_config = ParallelConfig(context_parallel_config=cp)
        try:
            if self.config.attention_backend is not None:
                model.set_attention_backend(self.config.attention_backend)
            device = next(model.parameters()).device
            if device.type != "cpu":
                model.enable_parallelism(config=self.parallel_config, cp_plan=self.plan)
            else:  # enable_parallelism's steps with a CPU mesh: its own device lookup divides by 0 accelerators
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
                self.parallel_config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
                model._parallel_config = self.parallel_config
                for processor, _ in self.saved:
                    if hasattr(processor, "_parallel_config"):
                        processor._parallel_config = self.parallel_config
                apply_context_parallel(model, cp, self.plan)
            # Outermost (registered last): it sees the whole sequence before diffusers' hook splits it.
            HookRegistry.check_if_exists_or_initialize(model).register_hook(SequenceCheckHook(self), HOOK_NAME)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self.parallel_config is None:
            return
        from diffusers.hooks.context_parallel import remove_context_parallel

        model = self.model
        registry = HookRegistry.check_if_exists_or_initialize(model)
        if HOOK_NAME in registry.hooks:
            registry.remove_hook(HOOK_NAME, recurse=False)
        if model._parallel_config is self.parallel_config:  # the hooks are on only once it was recorded
            remove_context_parallel(model, self.plan)
            del model._parallel_config  # back to the class's None
        for processor, own in self.saved:  # their attributes as they were (most fall back to the class's)
            for field in _PROCESSOR_FIELDS:
                vars(processor).pop(field, None)
            vars(processor).update(own)
        self.saved = []
        self.parallel_config = None

    def check_sequence(self, args, kwargs) -> None:
        """Each input the plan splits has a length the processes share equally (diffusers asserts it otherwise)."""
        from diffusers.models._modeling_parallel import ContextParallelInput

        inputs = self.plan.get("", {})
        world = self.ring * self.ulysses
        for name, split in inputs.items():
            if not isinstance(split, ContextParallelInput) or split.split_output or not isinstance(name, str):
                continue
            if name in kwargs:
                value = kwargs[name]
            else:
                names = _forward_names(type(self.model))
                index = names.index(name) if name in names else len(args)
                value = args[index] if index < len(args) else None
            if not isinstance(value, torch.Tensor) or (split.expected_dims is not None and value.dim() != split.expected_dims):
                continue
            length = value.shape[split.split_dim]
            if length % world:
                raise ValueError(
                    f"context parallelism splits {name} ({length} tokens along dim {split.split_dim}) over {world} "
                    f"processes, which does not divide it; change the image size or max_sequence_length so that "
                    f"every split sequence is a multiple of {world}")


class SequenceCheckHook(ModelHook):
    """A clear error for a sequence the processes cannot share equally, before diffusers' split hook asserts."""

    def __init__(self, state: ContextParallel):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.check_sequence(args, kwargs)
        return args, kwargs


def _backend_of(processor) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = processor._attention_backend
    if backend is None:
        backend, _ = _AttentionBackendRegistry.get_active_backend()
    return getattr(backend, "value", backend)


@functools.cache
def _forward_names(cls) -> list[str]:
    return list(inspect.signature(cls.forward).parameters)[1:]
