"""Encoder propagation: run the UNet encoder only at key steps (Li et al., "Faster Diffusion", 2023).

The encoder's features (`conv_in`, the down blocks and by default the mid block) change little
between steps while the decoder's change a lot, so at non-key steps the decoder runs on the
encoder features of the last key step with the current time embedding. Optional prior-noise
injection adds `prior_noise * z_T` to the latent from a fraction of the steps on, which the paper
uses to keep texture detail.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from ..errors import UnsupportedPipelineError
from ..session import get_session
from ._reuse import FeatureCache

HOOK_NAME = "accel.encoder_propagation"
_STATE = "_accel_encoder_propagation"
# The key steps the paper uses for DDIM with 50 steps (its t = 50, 49, 48, 47, 45, 40, 35, 25, 15).
PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@dataclass(frozen=True)
class EncoderPropagationConfig:
    """key_steps: step indices (0-based) at which the encoder runs; None scales the paper's DDIM-50
        key steps to the call's step count. Step 0 always runs the encoder.
    include_mid_block: treat the mid block as part of the encoder (as the paper does).
    prior_noise: scale of the initial latent z_T added to the latent (0 disables; the paper uses 0.003).
    prior_noise_from: fraction of the steps after which the injection starts.
    """

    key_steps: tuple[int, ...] | None = None
    include_mid_block: bool = True
    prior_noise: float = 0.0
    prior_noise_from: float = 0.1

    def __post_init__(self):
        if self.key_steps is not None:
            steps = tuple(self.key_steps)
            if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps):
                raise ValueError(f"EncoderPropagationConfig.key_steps={self.key_steps!r} is not supported; valid: None "
                                 "(the paper's schedule) or a non-empty sequence of step indices >= 0")
            object.__setattr__(self, "key_steps", tuple(sorted(set(steps))))
        if not isinstance(self.include_mid_block, bool):
            raise ValueError(f"EncoderPropagationConfig.include_mid_block={self.include_mid_block!r} is not supported; "
                             "valid choices: True, False")
        if not self.prior_noise >= 0.0:
            raise ValueError(f"EncoderPropagationConfig.prior_noise={self.prior_noise!r} is not supported; valid: a number >= 0")
        if not 0.0 <= self.prior_noise_from <= 1.0:
            raise ValueError(f"EncoderPropagationConfig.prior_noise_from={self.prior_noise_from!r} is not supported; "
                             "valid: a fraction in [0, 1]")


def key_steps(num_steps: int, config: EncoderPropagationConfig) -> frozenset[int]:
    """The steps at which the encoder runs for a call of `num_steps` steps."""
    if config.key_steps is not None:
        return frozenset({0, *config.key_steps})
    return frozenset({0} | {min(num_steps - 1, round(k * num_steps / 50)) for k in PAPER_KEY_STEPS})


def encoder_modules(unet, include_mid_block: bool = True) -> list:
    modules = [unet.conv_in, *unet.down_blocks]
    if include_mid_block and getattr(unet, "mid_block", None) is not None:
        modules.append(unet.mid_block)
    return modules


class _PriorNoise:
    """Adds `scale * z_T` to the latent the scheduler steps from, from step `start` on."""

    def __init__(self, pipe, config: EncoderPropagationConfig):
        self.scheduler = pipe.scheduler
        self.session = get_session(pipe)
        pipe_ref = weakref.ref(pipe)
        self.config = config
        self.initial = None
        self.session.add_call_listener(self._on_call)
        original = self.scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            index = self.session.step_index
            if index is None:  # outside a pipeline call
                return original(model_output, timestep, sample, *args, **kwargs)
            if index == 0 or self.initial is None:
                self.initial = sample.detach().clone()
            # The steps this call runs (after img2img strength), as in the feature cache.
            total = getattr(pipe_ref(), "_num_timesteps", None) or self.session.num_inference_steps or 1
            if index > 0 and index >= config.prior_noise_from * total:
                sample = sample + config.prior_noise * self.initial
            return original(model_output, timestep, sample, *args, **kwargs)

        # A scheduler is not a module: the wrapper is an instance attribute, deleted again on removal.
        self.scheduler.__dict__["step"] = step

    def _on_call(self, session) -> None:
        self.initial = None

    def remove(self) -> None:
        self.scheduler.__dict__.pop("step", None)
        self.session.remove_call_listener(self._on_call)


class EncoderPropagation:
    def __init__(self, pipe, config: EncoderPropagationConfig):
        modules = encoder_modules(pipe.unet, config.include_mid_block)
        self.cache = FeatureCache(pipe, HOOK_NAME, modules, lambda num_steps: key_steps(num_steps, config))
        self.prior_noise = _PriorNoise(pipe, config) if config.prior_noise > 0 else None

    @property
    def state(self):
        return self.cache.state

    def remove(self) -> None:
        if self.prior_noise is not None:
            self.prior_noise.remove()
        self.cache.remove()


def apply_encoder_propagation(pipe, config: EncoderPropagationConfig) -> EncoderPropagation:
    if _STATE in pipe.__dict__:
        raise RuntimeError("encoder propagation is already applied to this pipeline; call remove_encoder_propagation first")
    if not hasattr(pipe.unet, "down_blocks") or not hasattr(pipe.unet, "conv_in"):
        raise UnsupportedPipelineError(f"encoder propagation needs a UNet encoder, got {type(pipe.unet).__name__}")
    applied = EncoderPropagation(pipe, config)
    pipe.__dict__[_STATE] = applied
    return applied


def remove_encoder_propagation(pipe) -> None:
    applied = pipe.__dict__.pop(_STATE, None)
    if applied is None:
        raise RuntimeError("encoder propagation was not applied to this pipeline")
    applied.remove()


def get_encoder_propagation(pipe) -> EncoderPropagation | None:
    return pipe.__dict__.get(_STATE)
