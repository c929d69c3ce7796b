"""Encoder propagation: run the UNet encoder only at key steps (Li et al., "Faster Diffusion", 2023).

The encoder's features (`conv_in`, the down blocks and by default the mid block) change little
between steps while the decoder's change a lot, so at non-key steps the decoder runs on the
encoder features of the last key step with the current time embedding. Optional prior-noise
injection adds `prior_noise * z_T` to the latent from a fraction of the steps on, which the paper
uses to keep texture detail.

Parallel decoding (the paper's "parallel encoder propagation"): at a non-key step the decoder reads
only the kept encoder features, that step's time embedding and the step-independent conditioning
(text embeddings, SDXL's added conditioning) - not the step's latent. So on a key step the decoders
of the non-key steps up to the next key step can all run at once, as one batch along the batch
dimension with one timestep per copy; the sampler then still steps the latents one step at a time
in the pipeline's own loop, each non-key step taking its noise prediction from that batch instead
of calling the decoder. The outputs are the sequential ones (up to the batched kernels' rounding).
The key step's own decoder runs in its ordinary UNet call (the pipeline needs its output first), so
a key step makes two decoder calls: its own at the pipeline's batch and one for all the steps ahead.
This holds only where nothing the decoder reads depends on the step's latent: ControlNet and
T2I-Adapter residuals do, so those calls decode sequentially (and a pipeline with a ControlNet is
refused). The timesteps of the steps ahead are read from `scheduler.timesteps` at the session's step
index (the pipeline loop walks that list in order); the timestep the pipeline passed is checked to be
that entry by its address (the loop hands out views of the list), so no step waits for the GPU; a
copy is compared by value once per pipeline call.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch.utils import _pytree as pytree

from ..errors import UnsupportedPipelineError
from ..session import technique_functions
from ._reuse import CACHED, FULL, FeatureCache, tile_batch

logger = logging.getLogger(__name__)

NAME = "encoder_propagation"
HOOK_NAME = f"accel.{NAME}"
DECODE_HOOK_NAME = f"accel.{NAME}.parallel_decode"
# The key steps the paper uses for DDIM with 50 steps (its t = 50, 49, 48, 47, 45, 40, 35, 25, 15).
PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)
# UNet inputs computed from each step's latent (ControlNet, T2I-Adapter): decoders reading them cannot run ahead.
_PER_STEP_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


@dataclass(frozen=True)
class EncoderPropagationConfig:
    """key_steps: step indices (0-based) at which the encoder runs, for every step count; None uses the
        rule below, which scales with the call's step count. Step 0 always runs the encoder.
    key_interval: the rule's spacing: one key step every `key_interval` steps.
    dense_fraction: the rule's dense start: every step in the first `dense_fraction` of the steps
        is a key step; the spacing starts after it.
    include_mid_block: treat the mid block as part of the encoder (as the paper does).
    prior_noise: scale of the initial latent z_T added to the latent (0 disables; the paper uses 0.003).
    prior_noise_from: fraction of the steps after which the injection starts.
    parallel_decode: on each key step, run the decoders of the non-key steps up to the next key step
        as one batch (the paper's parallel decoding); needs eager or regionally compiled UNets.
    """

    key_steps: tuple[int, ...] | None = None
    key_interval: int = 2
    dense_fraction: float = 0.0
    include_mid_block: bool = True
    prior_noise: float = 0.0
    prior_noise_from: float = 0.1
    parallel_decode: bool = False

    def __post_init__(self):
        if self.key_steps is not None:
            steps = tuple(self.key_steps)
            if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps):
                raise ValueError(f"EncoderPropagationConfig.key_steps={self.key_steps!r} is not supported; valid: None "
                                 "(the key_interval / dense_fraction rule) or a non-empty sequence of step indices >= 0")
            object.__setattr__(self, "key_steps", tuple(sorted(set(steps))))
        if not isinstance(self.key_interval, int) or isinstance(self.key_interval, bool) or self.key_interval < 1:
            raise ValueError(f"EncoderPropagationConfig.key_interval={self.key_interval!r} is not supported; "
                             "valid: an int >= 1 (1 runs the encoder on every step)")
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ValueError(f"EncoderPropagationConfig.dense_fraction={self.dense_fraction!r} is not supported; "
                             "valid: a fraction in [0, 1]")
        for name in ("include_mid_block", "parallel_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EncoderPropagationConfig.{name}={getattr(self, name)!r} is not supported; "
                                 "valid choices: True, False")
        if not self.prior_noise >= 0.0:
            raise ValueError(f"EncoderPropagationConfig.prior_noise={self.prior_noise!r} is not supported; valid: a number >= 0")
        if not 0.0 <= self.prior_noise_from <= 1.0:
            raise ValueError(f"EncoderPropagationConfig.prior_noise_from={self.prior_noise_from!r} is not supported; "
                             "valid: a fraction in [0, 1]")


def key_steps(num_steps: int, config: EncoderPropagationConfig) -> frozenset[int]:
    """The steps at which the encoder runs for a call of `num_steps` steps.

    The rule: every step of the first `dense_fraction` of the steps, then one every `key_interval`
    steps. The default, a key step every other step, is calibrated on the embedded model
    (benchmarks/results/encoder-propagation/): it kept prompt adherence within a point of the uncached
    run at DPM-Solver++ 20 steps and at DDIM 50 steps, where every third step lost 6 points at 20 steps
    and the paper's DDIM-50 key set (`PAPER_KEY_STEPS`, gaps of up to 15 steps late in sampling) lost
    about 30 points at both.
    """
    if config.key_steps is not None:
        return frozenset({0, *config.key_steps})
    dense = math.ceil(config.dense_fraction * num_steps)
    return frozenset({0, *range(dense), *range(dense, num_steps, config.key_interval)})


def paper_key_steps(num_steps: int) -> tuple[int, ...]:
    """The paper's DDIM-50 key steps scaled to `num_steps` (this module's default before calibration)."""
    return tuple(sorted({0} | {min(num_steps - 1, round(k * num_steps / 50)) for k in PAPER_KEY_STEPS}))


def encoder_modules(unet, include_mid_block: bool = True) -> list:
    modules = [unet.conv_in, *unet.down_blocks]
    if include_mid_block and getattr(unet, "mid_block", None) is not None:
        modules.append(unet.mid_block)
    return modules


class _PriorNoise:
    """The paper's z_t <- z_t + scale * z_T from step `start` on: at the end of each step, the latent the next
    step starts from gets the initial latent z_T (what the pipeline's `prepare_latents` returned) added."""

    def __init__(self, session, config: EncoderPropagationConfig):
        self.session, self.config = session, config
        session.add_step_listener(self._on_step_end)

    def _on_step_end(self, step_index: int, callback_kwargs: dict) -> None:
        session, config, upcoming = self.session, self.config, step_index + 1
        initial, latents = session.initial_latents, callback_kwargs.get("latents")
        # The steps this call runs (after img2img strength), as in the feature cache.
        total = session.num_steps()
        if initial is None or latents is None or upcoming >= total or upcoming < config.prior_noise_from * total:
            return
        callback_kwargs["latents"] = latents + config.prior_noise * initial

    def remove(self) -> None:
        self.session.remove_step_listener(self._on_step_end)


class ParallelDecodeHook(ModelHook):
    """On the UNet: after a full call, decode the steps ahead up to the next key step as one batch;
    on their cached calls, return those outputs instead of running the decoder again."""

    def __init__(self, cache: FeatureCache, pipe):
        super().__init__()
        self.cache = cache
        self._pipe = weakref.ref(pipe)
        self.decoded: dict[tuple[int, int], torch.Tensor] = {}  # (slot, step) -> noise prediction
        self.batches: list[int] = []  # steps decoded by each batched call of the last pipeline call
        self.enabled = True  # for this pipeline call; off once the steps ahead could not be read
        self.checked = False  # the pipeline's timestep was compared with scheduler.timesteps by value this call

    def reset(self) -> None:
        self.decoded.clear()
        self.batches = []
        self.enabled, self.checked = True, False

    def new_forward(self, module, *args, **kwargs):
        state = self.cache.state
        arguments = self.cache.planner.arguments(args, kwargs)
        if state.mode == CACHED:
            ahead = self.decoded.pop((state.slot.index, state.step), None)
            if ahead is not None:
                return UNet2DConditionOutput(sample=ahead) if arguments.get("return_dict", True) else (ahead,)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if state.mode == FULL and self.enabled:
            self._decode_ahead(arguments)
        return output

    def _steps_ahead(self) -> list[int]:
        state, num_steps = self.cache.state, self.cache.session.num_steps()
        ahead = []
        for step in range(state.step + 1, num_steps):
            if step in state.schedule:
                break
            ahead.append(step)
        return ahead

    def _planned_timesteps(self, current, count: int) -> torch.Tensor | None:
        """The timesteps of the `count` steps after this one, from the scheduler; None if they cannot be trusted."""
        timesteps = self._pipe().scheduler.timesteps
        # Pipelines cut img2img's schedule from the front and report the steps they run.
        begin = len(timesteps) - self.cache.session.num_steps() + self.cache.state.step
        planned = timesteps[begin: begin + count + 1]
        if begin < 0 or len(planned) != count + 1 or not self._walks(current, planned[0]):
            logger.warning("accel: the pipeline's timestep does not match scheduler.timesteps at step %d; "
                           "encoder propagation decodes sequentially for the rest of this call", self.cache.state.step)
            self.enabled = False
            return None
        return planned[1:]

    def _walks(self, current, expected: torch.Tensor) -> bool:
        """Whether the pipeline passed `scheduler.timesteps`' entry for this step: a view of it (no sync), else
        equal by value (one host sync, once per pipeline call: then the loop is trusted to walk the list)."""
        current = torch.as_tensor(current)
        if current.numel() and current.data_ptr() == expected.data_ptr() and current.dtype == expected.dtype:
            return True
        if self.checked:
            return True
        self.checked = True
        return current.numel() > 0 and float(current.flatten()[0]) == float(expected)

    def _decode_ahead(self, arguments: dict) -> None:
        if any(arguments.get(name) is not None for name in _PER_STEP_INPUTS):
            return  # residuals from each step's latent: the steps ahead decode when they come
        ahead = self._steps_ahead()
        if not ahead:
            return
        timesteps = self._planned_timesteps(arguments["timestep"], len(ahead))
        if timesteps is None:
            return
        sample = arguments["sample"]
        batch, copies = sample.shape[0], len(ahead)

        def tile(x):  # per-sample inputs (text embeddings, SDXL's added conditioning, masks): one copy per step
            per_sample = isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch
            return tile_batch(x, copies) if per_sample else x

        # The sample is tiled too, though only its shape is read: conv_in returns the kept features.
        batched = {name: pytree.tree_map(tile, value) for name, value in arguments.items()}
        batched["timestep"] = timesteps.to(sample.device).repeat_interleave(batch)
        batched["return_dict"] = False
        state = self.cache.state
        state.mode, state.repeat = CACHED, copies
        try:
            noise = self.fn_ref.original_forward(**batched)[0]
        finally:
            state.mode, state.repeat = FULL, 1
        for step, chunk in zip(ahead, noise.chunk(copies)):
            self.decoded[(state.slot.index, step)] = chunk
        self.batches.append(copies)


class EncoderPropagation:
    """The applied encoder propagation: reuse hooks on the encoder, optionally the batched decoders of the steps
    ahead and the prior-noise injection; `remove()` undoes all of it."""

    def __init__(self, pipe, config: EncoderPropagationConfig, session):
        if not hasattr(pipe.unet, "down_blocks") or not hasattr(pipe.unet, "conv_in"):
            raise UnsupportedPipelineError(f"encoder propagation needs a UNet encoder, got {type(pipe.unet).__name__}")
        if config.parallel_decode:
            _check_parallel_decode(pipe)
        if config.prior_noise > 0 and "callback_on_step_end" not in inspect.signature(type(pipe).__call__).parameters:
            raise UnsupportedPipelineError(f"EncoderPropagationConfig(prior_noise > 0) adds to the latent at the end of "
                                           f"each step, through callback_on_step_end, which {type(pipe).__name__} lacks")
        modules = encoder_modules(pipe.unet, config.include_mid_block)
        self.cache = FeatureCache(pipe, session, NAME, modules, lambda num_steps: key_steps(num_steps, config))
        self.session = session
        self.decoder = None
        self.prior_noise = None
        try:
            if config.parallel_decode:
                self.decoder = ParallelDecodeHook(self.cache, pipe)
                HookRegistry.check_if_exists_or_initialize(pipe.unet).register_hook(self.decoder, DECODE_HOOK_NAME)
                self.session.add_call_listener(self._on_call)
            if config.prior_noise > 0:
                self.prior_noise = _PriorNoise(session, config)
        except BaseException:
            self._remove_decoder()
            self.cache.remove()
            raise

    @property
    def state(self):
        return self.cache.state

    def _on_call(self, session) -> None:
        self.decoder.reset()

    def _remove_decoder(self) -> None:
        if self.decoder is None:
            return
        self.session.remove_call_listener(self._on_call)
        registry = getattr(self.cache.unet, "_diffusers_hook", None)
        if registry is not None and DECODE_HOOK_NAME in registry.hooks:
            registry.remove_hook(DECODE_HOOK_NAME, recurse=False)
        self.decoder.reset()
        self.decoder = None

    def remove(self) -> None:
        if self.prior_noise is not None:
            self.prior_noise.remove()
        self._remove_decoder()
        self.cache.remove()


def _check_parallel_decode(pipe) -> None:
    for name in ("controlnet", "adapter"):
        if getattr(pipe, name, None) is not None:
            raise UnsupportedPipelineError(f"EncoderPropagationConfig(parallel_decode=True) cannot decode steps ahead with a "
                                           f"{name}: its residuals come from each step's latent; use parallel_decode=False")


# Without AccelConfig, on an accelerated pipeline.
apply_encoder_propagation, remove_encoder_propagation, get_encoder_propagation = technique_functions(NAME, EncoderPropagation)
