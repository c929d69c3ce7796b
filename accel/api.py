"""The drop-in entry points: `accelerate(pipe, ...)`, `restore(pipe)`, `from_pretrained(...)`."""

from __future__ import annotations

import logging

from .config import AccelConfig
from .errors import AlreadyAcceleratedError, NotAcceleratedError, UnsupportedPipelineError
from .pipelines import DENOISERS, denoiser_kind
from .registry import all_techniques, check_conflicts, technique_for
from .session import AccelSession, accelerated_class, attach, detach, get_session

logger = logging.getLogger(__name__)

SUPPORTED = (
    "diffusers pipelines whose denoiser `.unet` is a UNet2DConditionModel: StableDiffusion (1.x/2.x) and "
    "StableDiffusionXL text-to-image, img2img, inpaint and their ControlNet variants; and, for the configs that "
    "work on DiT transformers, pipelines whose `.transformer` runs its blocks from `transformer_blocks` "
    "(PixArt-Alpha/Sigma, Stable Diffusion 3, Flux)"
)
def _check_supported(pipe) -> None:
    if denoiser_kind(pipe) is None:
        unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
        found = (f".unet of type {type(unet).__name__}" if unet is not None else
                 f".transformer of type {type(transformer).__name__} without transformer_blocks" if transformer is not None else
                 "no .unet or .transformer")
        raise UnsupportedPipelineError(f"{type(pipe).__name__} is not supported ({found}); supported: {SUPPORTED}")


def _check_plan(pipe, plan) -> None:
    """Every technique of the plan works on this pipeline's denoiser (and passes its own check)."""
    kind = denoiser_kind(pipe)
    for technique, _ in plan:
        if kind not in technique.denoisers:
            needs = " or ".join(DENOISERS.get(d, d) for d in technique.denoisers)
            accepted = ", ".join(t.config_type.__name__ for t in all_techniques() if kind in t.denoisers) or "none"
            raise UnsupportedPipelineError(
                f"{technique.config_type.__name__} needs a pipeline with {needs}; {type(pipe).__name__} has "
                f"{DENOISERS.get(kind, kind)}, on which the accepted configs are: {accepted}")
        if technique.check is not None:
            technique.check(pipe)
    check_conflicts(plan)


def resolve_config(config: AccelConfig | None = None, preset: str | None = None, pipe=None) -> AccelConfig:
    """The config to apply: an explicit `AccelConfig`, a named preset (for `pipe`'s family), or nothing changed."""
    if config is not None and preset is not None:
        raise ValueError("pass either config or preset, not both")
    if preset is not None:
        from .presets import get_preset

        return get_preset(preset, pipe)
    if config is None:
        return AccelConfig()
    if not isinstance(config, AccelConfig):
        raise TypeError(f"config must be an AccelConfig, got {type(config).__name__}")
    return config


def accelerate(pipe, config: AccelConfig | None = None, *, preset: str | None = None):
    """Apply `config` (or the named `preset`) to `pipe` in place and return it.

    Every change is recorded so that `restore(pipe)` brings the pipeline back to producing
    bit-identical outputs. If any technique fails to apply, those already applied are removed
    again before the error propagates, so the pipeline is never left half-accelerated.
    """
    _check_supported(pipe)
    if get_session(pipe) is not None:
        raise AlreadyAcceleratedError(
            f"this {type(pipe).__name__} is already accelerated; call accel.restore(pipe) before applying another config"
        )
    config = resolve_config(config, preset, pipe)
    plan = sorted(((technique_for(c), c) for _, c in config.items()), key=lambda tc: tc[0].order)
    _check_plan(pipe, plan)

    session = AccelSession(config, type(pipe), pipe)
    session.original_components = dict(pipe.components)
    pipe.__dict__["_accel_session"] = session
    try:
        for technique, sub_config in plan:
            attach(pipe, technique.name, technique.build, sub_config)
            session.applied.append((technique, sub_config))
            logger.info("accel: applied %s: %r", technique.name, sub_config)
    except BaseException:
        _undo(pipe, session)
        raise
    pipe.__class__ = accelerated_class(session.original_class)
    return pipe


def _undo(pipe, session: AccelSession) -> None:
    errors = []
    for technique, _ in reversed(session.applied):
        try:
            detach(pipe, technique.name)
        except Exception as err:  # keep undoing the rest; report everything at the end
            errors.append(f"{technique.name}: {err}")
    session.applied.clear()
    session.close()
    pipe.__class__ = session.original_class
    del pipe.__dict__["_accel_session"]
    if errors:
        raise RuntimeError("restore could not undo every change: " + "; ".join(errors))


def restore(pipe):
    """Undo everything `accelerate` did to `pipe`, in reverse order, and return it."""
    session = get_session(pipe)
    if session is None:
        raise NotAcceleratedError(f"this {type(pipe).__name__} was not accelerated (or was already restored)")
    _undo(pipe, session)
    return pipe


def is_accelerated(pipe) -> bool:
    return get_session(pipe) is not None


def changes(pipe) -> list[dict]:
    """What `accelerate` changed on `pipe`, in the order it was applied."""
    session = get_session(pipe)
    return [] if session is None else session.changes()


def from_pretrained(model: str | None = None, *, preset: str | None = None, config: AccelConfig | None = None,
                    **kwargs):
    """`DiffusionPipeline.from_pretrained(model, **kwargs)`, then `accelerate` with `preset` or `config`.

    `model` None loads the embedded default model, as the CLI does. Without `preset` or `config` the pipeline is
    returned as loaded, not accelerated, so a later `accelerate(pipe, ...)` applies what it is given.
    """
    from diffusers import DiffusionPipeline

    if model is None:
        from .embedded import EMBEDDED_MODEL_DIR

        model = str(EMBEDDED_MODEL_DIR)
    pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    if preset is None and config is None:
        return pipe
    return accelerate(pipe, config, preset=preset)
