"""The session `accelerate` keeps on a pipeline: what was applied, each technique's state, one plan per denoiser call.

The pipeline loop reports its step index through `callback_on_step_end` (or the legacy `callback`). Every
denoiser call is planned once, before it runs, by a forward pre-hook on the denoiser (`CallPlanner`): it binds
the call's arguments by name, counts the call within its step, gives the call position a slot (one per call
index, input shape, dtype and device: cond and uncond when a pipeline calls the denoiser twice a step) and asks
every technique that decides per call for its decision (full or cached, fresh or stale exchange, ...). The
record of that call (`DenoiserCall`) is what hooks read and what the CUDA-graph hook keys its graphs on; no
technique counts steps or slots of its own.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

# More denoiser calls than this within one step: the step index is not advancing (a loop accel does not see).
MAX_CALLS_PER_STEP = 8


class DenoiserCall:
    """What the session knows of one denoiser call before it runs.

    step: the pipeline loop's step index; None when the call is not planned (outside a pipeline call, with
        gradients on, without a tensor sample, or once the step index stopped advancing).
    index: the call within its step. slot: a small int naming the call position (index, input shape, dtype,
        device), stable while the pipeline stays accelerated: techniques keep per-position state under it.
    arguments: the call's arguments by parameter name. sample: the first one (the latent).
    graphed: a CUDA-graph hook captures this denoiser's calls.
    decisions: each technique's decision for this call, by technique name; key: the same as a tuple, which the
        CUDA-graph hook adds to its graph key. eager: a technique needs this call to run outside any graph.
    """

    __slots__ = ("step", "index", "slot", "arguments", "sample", "graphed", "decisions", "key", "eager", "args")

    def __init__(self, step, index, slot, arguments, sample, graphed, args=()):
        self.step, self.index, self.slot = step, index, slot
        self.arguments, self.sample, self.graphed, self.args = arguments, sample, graphed, args
        self.decisions: dict[str, Any] = {}
        self.key: tuple = ()
        self.eager = False

    def run_eagerly(self) -> None:
        """This call cannot be replayed from a graph (it syncs with the host, or registers buffers first)."""
        self.eager = True


class CallPlanner:
    """The forward pre-hook on one denoiser that makes each call's `DenoiserCall` and collects the decisions."""

    def __init__(self, session: "AccelSession", module: torch.nn.Module):
        self.session = session
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # the class's: not a hook's wrapper
        self.names = []
        for parameter in parameters:
            if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
                break
            self.names.append(parameter.name)
        self.graphed = False  # a CUDA-graph hook captures this denoiser (set by the hook)
        self.deciders: dict[str, Callable[[DenoiserCall], Any]] = {}
        self.current = DenoiserCall(None, 0, None, {}, None, False)
        self._slots: dict[tuple, int] = {}
        self._step: int | None = None
        self._index = 0
        self._handle = module.register_forward_pre_hook(self._plan, with_kwargs=True)
        session.add_call_listener(self._on_call)
        _PLANNERS[module] = self
        self._module = weakref.ref(module)

    def add_decider(self, name: str, decide: Callable[[DenoiserCall], Any]) -> None:
        """`decide(call)` runs before every call and returns the technique's (hashable) decision for it."""
        if name in self.deciders:
            raise RuntimeError(f"{name} already decides the calls of this denoiser")
        self.deciders[name] = decide

    def remove_decider(self, name: str) -> None:
        self.deciders.pop(name, None)

    def arguments(self, args: tuple, kwargs: dict) -> dict:
        """A hook's arguments by name: the planned call's binding when these are its arguments, else bound here."""
        if not args:
            return kwargs
        call = self.current
        if len(args) == len(call.args) and all(a is b for a, b in zip(args, call.args)):
            return call.arguments
        return self._bind(args, kwargs)

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.names):
            raise TypeError(f"{len(args)} positional arguments for a denoiser forward that takes {len(self.names)}")
        return {**dict(zip(self.names, args)), **kwargs}

    def _on_call(self, session) -> None:
        self._step, self._index = None, 0

    def _plan(self, module, args, kwargs):
        arguments = self._bind(args, kwargs) if args else kwargs
        sample = arguments.get(self.names[0]) if self.names else None
        step, index, slot = self.session.step_index, 0, None
        if step is None or not isinstance(sample, torch.Tensor) or torch.is_grad_enabled():
            step = None
        else:
            if step != self._step:
                self._step, self._index = step, 0
            else:
                self._index += 1
            index = self._index
            if index < MAX_CALLS_PER_STEP:
                position = (index, tuple(sample.shape), sample.dtype, sample.device)
                slot = self._slots.setdefault(position, len(self._slots))
            else:
                if index == MAX_CALLS_PER_STEP:
                    logger.warning("accel: %d denoiser calls at step %d; the step index is not advancing, so %s "
                                   "is off for the rest of this call", index, step, ", ".join(self.deciders) or "nothing")
                step = None
        call = DenoiserCall(step, index, slot, arguments, sample, self.graphed, args)
        for name, decide in self.deciders.items():
            call.decisions[name] = decide(call)
        if call.decisions:
            call.key = tuple(call.decisions.items())
        self.current = call
        return None

    def close(self) -> None:
        self._handle.remove()
        self.session.remove_call_listener(self._on_call)
        self.deciders.clear()
        module = self._module()
        if module is not None and _PLANNERS.get(module) is self:
            del _PLANNERS[module]


# Each planned denoiser's planner, for hooks applied to the module itself (the CUDA-graph hook).
_PLANNERS: "weakref.WeakKeyDictionary[torch.nn.Module, CallPlanner]" = weakref.WeakKeyDictionary()


def planner_of(module: torch.nn.Module) -> CallPlanner | None:
    """The call planner of `module` while it is the denoiser of an accelerated pipeline, else None."""
    return _PLANNERS.get(module)


class AccelSession:
    """What `accelerate` records on a pipeline: the config, the techniques applied and their state, call state."""

    def __init__(self, config, original_class: type, pipe=None):
        self.config = config
        self.original_class = original_class
        self.applied: list = []  # registry.Technique entries, in the order they were applied
        self.state: dict[str, Any] = {}  # each applied technique's state, by technique name
        self.call_defaults: dict[str, Any] = {}
        self.step_index: int | None = None
        self.num_inference_steps: int | None = None
        self.call_arguments: dict[str, Any] = {}  # the pipeline call's arguments by name, its defaults included
        self.initial_latents: torch.Tensor | None = None  # what the pipeline's prepare_latents returned this call
        self._pipe = weakref.ref(pipe) if pipe is not None else (lambda: None)
        self._call_listeners: list[Callable[["AccelSession"], None]] = []
        self._step_listeners: list[Callable[[int, dict], None]] = []
        self._call_end_listeners: list[Callable[["AccelSession", bool], None]] = []
        self._planners: dict[int, CallPlanner] = {}
        self.original_components: dict[str, Any] = {}  # the pipeline's components before anything was applied

    def add_call_listener(self, fn: Callable[["AccelSession"], None]) -> None:
        """`fn(session)` runs at the start of every pipeline call."""
        self._call_listeners.append(fn)

    def remove_call_listener(self, fn) -> None:
        if fn in self._call_listeners:
            self._call_listeners.remove(fn)

    def add_call_end_listener(self, fn: Callable[["AccelSession", bool], None]) -> None:
        """`fn(session, completed)` runs at the end of every pipeline call; `completed` is False when it raised."""
        self._call_end_listeners.append(fn)

    def remove_call_end_listener(self, fn) -> None:
        if fn in self._call_end_listeners:
            self._call_end_listeners.remove(fn)

    def add_step_listener(self, fn: Callable[[int, dict], None]) -> None:
        """`fn(step_index, callback_kwargs)` runs at the end of every step, before the user's callback; it may
        replace `callback_kwargs["latents"]`, which the pipeline steps on from."""
        self._step_listeners.append(fn)

    def remove_step_listener(self, fn) -> None:
        if fn in self._step_listeners:
            self._step_listeners.remove(fn)

    def planner(self, module: torch.nn.Module) -> CallPlanner:
        """The call planner of `module` (a denoiser), made on first use."""
        planner = self._planners.get(id(module))
        if planner is None:
            planner = self._planners[id(module)] = CallPlanner(self, module)
        return planner

    def num_steps(self) -> int:
        """The steps of the pipeline call in progress."""
        # Set by diffusers pipelines before their loop, after img2img strength has cut the schedule.
        steps = getattr(self._pipe(), "_num_timesteps", None)
        return int(steps or self.num_inference_steps or 1)

    def changes(self) -> list[dict[str, Any]]:
        """Every change `accelerate` made, in order, for logs and reports."""
        return [{"technique": t.name, "config": repr(c)} for t, c in self.applied]

    def begin_call(self, num_inference_steps: int | None, arguments: dict[str, Any] | None = None) -> None:
        self.step_index = 0
        self.num_inference_steps = num_inference_steps
        self.call_arguments = arguments or {}
        self.initial_latents = None
        for fn in list(self._call_listeners):
            fn(self)

    def end_call(self, completed: bool = True) -> None:
        for fn in list(self._call_end_listeners):
            fn(self, completed)
        self.step_index = None
        self.num_inference_steps = None
        self.call_arguments = {}
        self.initial_latents = None

    def close(self) -> None:
        """After every technique is removed: the planners' hooks go too."""
        for planner in self._planners.values():
            planner.close()
        self._planners.clear()


def get_session(pipe) -> AccelSession | None:
    return pipe.__dict__.get("_accel_session")


def _session_for(pipe, name: str) -> AccelSession:
    session = get_session(pipe)
    if session is None:
        raise RuntimeError(f"{name} needs the step index and call plan of an accelerated pipeline; use accel.accelerate")
    return session


def attach(pipe, name: str, build: Callable, config) -> Any:
    """Apply technique `name`: `build(pipe, config, session)` makes its state, whose `remove()` undoes it."""
    session = _session_for(pipe, name)
    if name in session.state:
        raise RuntimeError(f"{name} is already applied to this pipeline; call accel.restore(pipe) first")
    state = session.state[name] = build(pipe, config, session)
    return state


def detach(pipe, name: str) -> None:
    """Undo technique `name` on `pipe`."""
    session = get_session(pipe)
    state = None if session is None else session.state.pop(name, None)
    if state is None:
        raise RuntimeError(f"{name} was not applied to this pipeline")
    state.remove()


def attached(pipe, name: str):
    """The state of technique `name` on `pipe`, or None."""
    session = get_session(pipe)
    return None if session is None else session.state.get(name)


def technique_functions(name: str, build: Callable) -> tuple[Callable, Callable, Callable]:
    """`apply_x(pipe, config)`, `remove_x(pipe)` and `get_x(pipe)` of technique `name` on an accelerated pipeline."""

    def apply(pipe, config):
        return attach(pipe, name, build, config)

    def remove(pipe) -> None:
        detach(pipe, name)

    def get(pipe):
        return attached(pipe, name)

    return apply, remove, get


def _step_counter(session: AccelSession, user_callback):
    """Chain a step counter (and the session's step listeners) in front of the user's `callback_on_step_end`."""

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        session.step_index = step_index + 1
        for fn in session._step_listeners:
            fn(step_index, callback_kwargs)
        if user_callback is None:
            return callback_kwargs
        return user_callback(pipe, step_index, timestep, callback_kwargs)

    return on_step_end


def _legacy_step_counter(session: AccelSession, user_callback, every: int):
    """The same for pipelines that report steps through `callback(step, timestep, latents)` (PixArt-Alpha):
    called at every step, passing on to the user's callback every `every` steps as the pipeline would."""

    def callback(step, timestep, latents):
        session.step_index = step + 1
        if user_callback is not None and step % every == 0:
            user_callback(step, timestep, latents)

    return callback


class AcceleratedCall:
    """Mixin put in front of an accelerated pipeline's class.

    Swapping the instance's class (and back in `restore`) is the one reversible way to give a
    pipeline per-call defaults and per-call state resets, since `__call__` is looked up on the type.
    """

    def __call__(self, *args, **kwargs):
        session: AccelSession = self.__dict__["_accel_session"]
        signature = _call_signature(session.original_class)
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        for name, value in session.call_defaults.items():
            if name not in bound and name in signature.parameters:
                kwargs[name] = bound[name] = value
        if "callback_on_step_end" in signature.parameters:
            user_callback = bound.get("callback_on_step_end")
            tensor_inputs = getattr(user_callback, "tensor_inputs", None)
            if tensor_inputs is not None:
                # The pipeline reads tensor_inputs from callback objects; a plain function carries none.
                kwargs["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
            if session._step_listeners:  # they step on from the latents, so the pipeline must hand them over
                inputs = kwargs.get("callback_on_step_end_tensor_inputs",
                                    bound.get("callback_on_step_end_tensor_inputs",
                                              signature.parameters["callback_on_step_end_tensor_inputs"].default))
                if "latents" not in inputs:
                    kwargs["callback_on_step_end_tensor_inputs"] = [*inputs, "latents"]
            if "callback_on_step_end" in kwargs or user_callback is None:
                kwargs["callback_on_step_end"] = _step_counter(session, user_callback)
        elif "callback" in signature.parameters and "callback_steps" in signature.parameters:
            if all(name in kwargs or name not in bound for name in ("callback", "callback_steps")):
                every = bound.get("callback_steps") or signature.parameters["callback_steps"].default or 1
                kwargs["callback"] = _legacy_step_counter(session, bound.get("callback"), every)
                kwargs["callback_steps"] = 1
        steps = kwargs.get("num_inference_steps", bound.get("num_inference_steps"))
        if steps is None and "num_inference_steps" in signature.parameters:
            steps = signature.parameters["num_inference_steps"].default
        defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
        session.begin_call(steps, {**defaults, **bound})
        completed = False
        try:
            result = super().__call__(*args, **kwargs)
            completed = True
            return result
        finally:
            session.end_call(completed)

    @property
    def components(self):
        """The pipeline's components with its own scheduler, not accel's: `Pipeline.from_pipe(pipe)` and
        `Pipeline(**pipe.components)` make pipelines that `restore(pipe)` cannot reach, so they must not keep a
        swapped scheduler. Modules stay the current ones (offloading and `.to` move what runs): their hooks and
        casts are undone in place by `restore`, but a swapped-in denoiser (`UNetSwapConfig`) stays in such a copy, so
        make copies before `accelerate` or after `restore` when swapping."""
        originals = self.__dict__["_accel_session"].original_components
        return {name: originals[name] if name in originals and not isinstance(component, torch.nn.Module) else component
                for name, component in super().components.items()}

    def prepare_latents(self, *args, **kwargs):
        """The pipeline's own; the session keeps the initial latent (z_T) it returns for this call."""
        latents = super().prepare_latents(*args, **kwargs)
        self.__dict__["_accel_session"].initial_latents = latents[0] if isinstance(latents, tuple) else latents
        return latents


_SIGNATURES: dict[type, inspect.Signature] = {}
_CLASSES: dict[type, type] = {}


def _call_signature(cls: type) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.__call__)
    return _SIGNATURES[cls]


def accelerated_class(cls: type) -> type:
    """The subclass of `cls` with `AcceleratedCall` in front, one per pipeline class, same name."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (AcceleratedCall, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _CLASSES[cls]
