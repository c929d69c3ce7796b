"""CUDA-graph capture of a denoiser step (Stable Diffusion UNets are launch-bound on H100-class GPUs).

One graph per input signature (shapes, dtypes, devices, non-tensor arguments and a branch tag that
other techniques may set), all drawing from one memory pool. Inputs are copied into static
buffers and the graph is replayed; anything that cannot be captured runs eagerly, with one log line.
"""

from __future__ import annotations

import inspect
import logging

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

HOOK_NAME = "accel.cuda_graph"
# A tag value that makes the hook run the current call eagerly (e.g. a call that syncs with the host).
RUN_EAGERLY = "accel.run_eagerly"


class _Graph:
    """A captured call: the CUDA graph, its static inputs (flattened leaves), its static output, its memory pool."""

    def __init__(self, graph, static_inputs, static_output, pool=None):
        self.graph = graph
        self.static_inputs = static_inputs
        self.static_output = static_output
        self.pool = pool

    def replay(self, leaves):
        """Copy `leaves` (flattened as at capture) into the static inputs, replay, return a copy of the output."""
        for static, leaf in zip(self.static_inputs, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        self.graph.replay()
        # The next replay overwrites the static output; callers may keep this one across steps.
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.static_output)


def capture_graph(fn, leaves, spec, device, *, warmup_iters: int = 2, pool=None) -> _Graph:
    """Capture `fn(tree)` as one CUDA graph, `tree` being static copies (on `device`) of `leaves` unflattened
    with `spec`. `warmup_iters` eager runs on a side stream come first; the graph draws from `pool` (a new
    one when None, kept as the result's `.pool` for the next capture to share). Raises what capture raises."""
    static_inputs = [leaf.to(device).clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def run():
        return fn(pytree.tree_unflatten(static_inputs, spec))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_iters):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    if pool is None:
        pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_output = run()
    return _Graph(graph, static_inputs, static_output, pool)


class CUDAGraphHook(ModelHook):
    """Capture the wrapped forward per signature on first use and replay it afterwards."""

    def __init__(self, warmup_iters: int = 2):
        super().__init__()
        self.warmup_iters = warmup_iters
        self.graphs: dict[tuple, _Graph | None] = {}  # None marks a signature that could not be captured
        self.branch: object = None  # set by caching techniques so each branch gets its own graph
        # Per-technique parts of the key, set before each call by techniques whose host-side state picks
        # what the call does (patch parallelism: synchronous or asynchronous exchange); RUN_EAGERLY: no graph.
        self.tags: dict[str, object] = {}
        self.pool = None
        self._signature: inspect.Signature | None = None
        self._warned = False

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def _normalise(self, args, kwargs) -> dict | None:
        """Bind to parameter names (None if extra positional arguments are used) and turn a number
        timestep into a device tensor of the sample's device."""
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
        arguments = self._normalise(args, kwargs)
        if arguments is None:
            return forward(*args, **kwargs)
        if RUN_EAGERLY in self.tags.values():
            return forward(**arguments)
        leaves, spec = pytree.tree_flatten(arguments)
        key = signature_key(leaves, spec, (self.branch, *sorted(self.tags.items())) if self.tags else self.branch)
        if key is None:
            if not self._warned:
                logger.warning("accel: CUDA graphs need the inputs on one CUDA device; running eagerly")
                self._warned = True
            return forward(**arguments)
        entry = self.graphs.get(key, False)
        if entry is False:
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


def signature_key(leaves, spec, branch=None, device_type: str = "cuda") -> tuple | None:
    """What a graph is keyed by: argument structure, shapes, dtypes, constants, branch, device.

    Tensor values (the latents, the timestep) are not part of the key: they are copied into the
    graph's static inputs. None when the inputs cannot be replayed from one CUDA device.
    """
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    device = next((t.device for t in tensors if t.device.type == device_type), None)
    # Host scalars (a CPU timestep) are copied in; any larger host tensor means eager.
    if device is None or any(t.device != device and t.numel() > 1 for t in tensors):
        return None
    shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else _constant_key(x) for x in leaves)
    return (spec, branch, shapes, device)


def _constant_key(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def apply_cuda_graph(module: torch.nn.Module, warmup_iters: int = 2) -> CUDAGraphHook:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        raise RuntimeError("CUDA graphs are already enabled on this module")
    hook = CUDAGraphHook(warmup_iters)
    registry.register_hook(hook, HOOK_NAME)
    return hook


def get_cuda_graph_hook(module: torch.nn.Module) -> CUDAGraphHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def remove_cuda_graph(module: torch.nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry.hooks:
        return
    registry.hooks[HOOK_NAME].reset_graphs()
    registry.remove_hook(HOOK_NAME, recurse=False)
