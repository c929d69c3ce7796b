"""`AccelConfig`: one optional sub-config per kind of technique.

Each slot takes the config of any technique registered for it (see `accel.registry`), so a new
caching method is a new config class in the `cache` slot, not a new field here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .registry import SLOTS, techniques_for_slot


@dataclass(frozen=True)
class AccelConfig:
    """What to accelerate. Every slot defaults to `None`: nothing is changed unless asked.

    Slots, in the order they are applied: `model` (swapped or adapted weights), `sampler`
    (solver and step schedule), `cache` (feature caching / step skipping), `parallel`
    (multi-GPU), `runtime` (attention backend, compilation, CUDA graphs).
    """

    model: object | None = None
    sampler: object | None = None
    cache: object | None = None
    parallel: object | None = None
    runtime: object | None = None

    def __post_init__(self):
        for slot in SLOTS:
            value = getattr(self, slot)
            if value is None:
                continue
            accepted = techniques_for_slot(slot)
            if type(value) not in accepted:
                names = ", ".join(cls.__name__ for cls in accepted) or "none registered yet"
                namesake = [cls for cls in accepted if cls.__name__ == type(value).__name__]
                hint = (f" (got {type(value).__module__}.{type(value).__name__}, not {namesake[0].__module__}."
                        f"{namesake[0].__name__})" if namesake else "")  # diffusers' ContextParallelConfig, say
                raise ValueError(
                    f"AccelConfig.{slot} got {type(value).__name__}; accepted config types for '{slot}': {names}{hint}"
                )

    def items(self):
        """(slot, sub-config) pairs that are set, in application order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def replace(self, **changes) -> "AccelConfig":
        """A copy with some slots changed; the original stays as it was."""
        from dataclasses import replace

        return replace(self, **changes)
