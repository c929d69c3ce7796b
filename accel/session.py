"""Per-call state shared by the techniques applied to one pipeline.

Techniques register listeners that run at the start of every pipeline call (to reset caches per
call) and read the step index that the pipeline loop reports through `callback_on_step_end`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)

# More denoiser calls than this within one step: the step index is not advancing (a loop accel does not see).
MAX_CALLS_PER_STEP = 8


def count_step_call(state, step: int, what: str) -> bool:
    """Advance `state.step` / `state.call_in_step` for a denoiser call at pipeline step `step`. False, with
    one warning, once a step has had MAX_CALLS_PER_STEP calls: `what` (a technique) turns itself off."""
    if step != state.step:
        state.step, state.call_in_step = step, 0
    else:
        state.call_in_step += 1
    if state.call_in_step < MAX_CALLS_PER_STEP:
        return True
    if state.call_in_step == MAX_CALLS_PER_STEP:
        logger.warning("accel: %d denoiser calls at step %d; the step index is not advancing, so %s is off for the "
                       "rest of this call", state.call_in_step, step, what)
    return False


class AccelSession:
    """What `accelerate` records on a pipeline: the config, the techniques applied, call state."""

    def __init__(self, config, original_class: type):
        self.config = config
        self.original_class = original_class
        self.applied: list = []  # registry.Technique entries, in the order they were applied
        self.call_defaults: dict[str, Any] = {}
        self.step_index: int | None = None
        self.num_inference_steps: int | None = None
        self._call_listeners: list[Callable[["AccelSession"], None]] = []

    def add_call_listener(self, fn: Callable[["AccelSession"], None]) -> None:
        """`fn(session)` runs at the start of every pipeline call."""
        self._call_listeners.append(fn)

    def remove_call_listener(self, fn) -> None:
        if fn in self._call_listeners:
            self._call_listeners.remove(fn)

    def changes(self) -> list[dict[str, Any]]:
        """Every change `accelerate` made, in order, for logs and reports."""
        return [{"technique": t.name, "config": repr(c)} for t, c in self.applied]

    def begin_call(self, num_inference_steps: int | None) -> None:
        self.step_index = 0
        self.num_inference_steps = num_inference_steps
        for fn in list(self._call_listeners):
            fn(self)

    def end_call(self) -> None:
        self.step_index = None
        self.num_inference_steps = None


def get_session(pipe) -> AccelSession | None:
    return pipe.__dict__.get("_accel_session")


def _step_counter(session: AccelSession, user_callback):
    """Chain a step counter in front of the user's `callback_on_step_end`, if any."""

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        session.step_index = step_index + 1
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
                kwargs[name] = value
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        if "callback_on_step_end" in signature.parameters:
            user_callback = bound.get("callback_on_step_end")
            tensor_inputs = getattr(user_callback, "tensor_inputs", None)
            if tensor_inputs is not None:
                # The pipeline reads tensor_inputs from callback objects; a plain function carries none.
                kwargs["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
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
        session.begin_call(steps)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            session.end_call()


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
