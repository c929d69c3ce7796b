"""CUDA-graph capture of a denoiser step (Stable Diffusion UNets are launch-bound on H100-class GPUs).

One graph per input signature (shapes, dtypes, devices, non-tensor arguments) and, on the denoiser, per plan of
the call (the session's `DenoiserCall.key`: each technique's decision, such as a full or a cached step), all
drawing from one memory pool. Inputs are copied into static buffers and the graph is replayed; a call the plan
marks eager, and anything that cannot be captured, runs eagerly (the latter with one log line). While a background
compile runs (`accel.runtime.compile.BackgroundCompile`), calls run eagerly and capture after it.
"""

from __future__ import annotations

import inspect
import logging

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from ..capture import _Graph, capture_graph, capture_paused, signature_key
from ..session import planner_of
from .compile import compile_generation, compile_settled

logger = logging.getLogger(__name__)

HOOK_NAME = "accel.cuda_graph"


class CUDAGraphHook(ModelHook):
    """Capture the wrapped forward per signature on first use and replay it afterwards.

    planner: the session's `CallPlanner` of this module (a denoiser), whose current call's arguments and
    plan the hook uses; None elsewhere (VAE decoder, text encoders), where the hook binds the arguments itself.
    """

    def __init__(self, warmup_iters: int = 2, planner=None):
        super().__init__()
        self.warmup_iters = warmup_iters
        self.planner = planner
        self.graphs: dict[tuple, _Graph | None] = {}  # None marks a signature that could not be captured
        self.pool = None
        self._signature: inspect.Signature | None = None
        self._warned = False
        self._generation = 0  # of the module's background compile, when the graphs were captured

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def _normalise(self, args, kwargs) -> dict | None:
        """Bind to parameter names (None if extra positional arguments are used) and turn a number
        timestep into a device tensor of the sample's device."""
        if self.planner is not None:
            arguments = dict(self.planner.arguments(args, kwargs))  # bound once per call, by the session
        else:
            bound = self._signature.bind(*args, **kwargs)
            arguments = {}
            for name, value in bound.arguments.items():
                kind = self._signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    return None
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)  # **kwargs travel as keywords, not as one argument named "kwargs"
                else:
                    arguments[name] = value
        sample = next(iter(arguments.values()), None)
        timestep = arguments.get("timestep")
        if isinstance(sample, torch.Tensor) and isinstance(timestep, (int, float)):
            arguments["timestep"] = torch.tensor(timestep, device=sample.device, dtype=torch.float32)
        return arguments

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if torch.is_grad_enabled():
            return forward(*args, **kwargs)
        plan = None if self.planner is None else self.planner.current
        if plan is not None and plan.eager:
            return forward(*args, **kwargs)
        arguments = self._normalise(args, kwargs)
        if arguments is None:
            return forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(arguments)
        key = signature_key(leaves, spec, plan.key if plan is not None and plan.key else None)
        if key is None:
            if not self._warned:
                logger.warning("accel: CUDA graphs need the inputs on one CUDA device; running eagerly")
                self._warned = True
            return forward(**arguments)
        generation = compile_generation(module)
        if generation != self._generation:  # the background compile moved the calls to other compiled code
            self.graphs.clear()
            self._generation = generation
        entry = self.graphs.get(key, False)
        if entry is False:
            if capture_paused() or not compile_settled(module, (), arguments):
                return forward(**arguments)  # captured once the background compile is over
            entry = self.graphs[key] = self._capture(forward, leaves, spec, key[-1])
        if entry is None:
            return forward(**arguments)
        return entry.replay(leaves)

    def _capture(self, forward, leaves, spec, device) -> _Graph | None:
        try:
            entry = capture_graph(lambda arguments: forward(**arguments), leaves, spec, device,
                                  warmup_iters=self.warmup_iters, pool=self.pool)
        except Exception as err:  # capture is an optimisation: fall back to eager, say so once
            logger.warning("accel: CUDA-graph capture failed (%s: %s); running this signature eagerly", type(err).__name__, err)
            return None
        self.pool = entry.pool
        return entry

    def reset_graphs(self) -> None:
        self.graphs.clear()


def apply_cuda_graph(module: torch.nn.Module, warmup_iters: int = 2) -> CUDAGraphHook:
    """Capture `module`'s calls; on an accelerated pipeline's denoiser, per plan of each call."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        raise RuntimeError("CUDA graphs are already enabled on this module")
    planner = planner_of(module)
    hook = CUDAGraphHook(warmup_iters, planner)
    registry.register_hook(hook, HOOK_NAME)
    if planner is not None:
        planner.graphed = True  # techniques plan for a captured call (the block cache's device path)
    return hook


def get_cuda_graph_hook(module: torch.nn.Module) -> CUDAGraphHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def remove_cuda_graph(module: torch.nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry.hooks:
        return
    hook = registry.hooks[HOOK_NAME]
    hook.reset_graphs()
    registry.remove_hook(HOOK_NAME, recurse=False)
    if hook.planner is not None:
        hook.planner.graphed = False
