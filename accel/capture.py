"""CUDA-graph capture and replay primitives (whole denoiser calls in the runtime, single blocks in the block cache).

A captured call copies its inputs into static buffers and replays; graphs are keyed by what a replay cannot
change: the structure, shapes, dtypes and device of the inputs and their non-tensor values.
"""

from __future__ import annotations

import threading

import torch
from torch.utils import _pytree as pytree


# Background compiles running in this process (`accel.runtime.compile`). While one runs, nothing is captured: a
# capture in one thread fails when another thread launches kernels or allocates on the device meanwhile.
_pause_lock = threading.Lock()
_pauses = 0


def pause_capture() -> None:
    global _pauses
    with _pause_lock:
        _pauses += 1


def resume_capture() -> None:
    global _pauses
    with _pause_lock:
        _pauses = max(0, _pauses - 1)


def capture_paused() -> bool:
    """A background compile is running: calls that would capture a CUDA graph run eagerly and capture later."""
    return _pauses > 0


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


def signature_key(leaves, spec, branch=None, device_type: str = "cuda") -> tuple | None:
    """What a graph is keyed by: argument structure, shapes, dtypes, constants, branch, device.

    `branch`: what else picks the graph (the plan of a denoiser call, a block's name). Tensor values (the latents, the timestep) are not part of the key: they are copied into the
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
