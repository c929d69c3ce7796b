"""The Gradio app: what each acceleration costs and gives, on one prompt and seed.

The same prompt, seed, size and guidance run twice through one pipeline: as loaded (the baseline),
then under `accel.accelerate(pipe, config)` and `accel.restore(pipe)`. The page shows both images
side by side with the latency of each, the speed-up, PSNR / SSIM of the accelerated image to the
baseline and, on the embedded CIFAR-10 model, the project's classifier's verdict on the prompted
class; next to them the speed-vs-quality plot of every measured config (`benchmarks/results/`,
see `apps/pareto.py`) with the current run as a live point.

    accel app                                    # the embedded model, http://127.0.0.1:7860
    accel app --model path/to/sd15 --port 8080   # any local diffusers folder or Hub id
    accel app --host 0.0.0.0                     # listen beyond this machine: only when asked

The model is chosen when the app starts, not from the page, and only safetensors weights are
loaded. Generation runs under one lock behind Gradio's queue (one generation at a time), so
concurrent users wait their turn instead of interleaving on the shared pipeline.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

import accel
from accel.quality import psnr, ssim
from accel.runtime import background_compiles
from apps.arguments import add_app_arguments
from apps.loading import without_gpu_only_runtime

# Gradio must not phone home (usage statistics, version checks); set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
STEPS_RANGE = (1, 200)
NO_PRESET = "none (use the controls)"
KEEP_SAMPLER = "model's own scheduler"
CACHE_CHOICES = ("none", "deepcache", "encoder_propagation", "block_cache")
COMPILE_CHOICES = ("off", "regional", "full")
# Any other model: the diffusers Stable Diffusion pipelines' own defaults.
OTHER_STEPS, OTHER_GUIDANCE = 50, 7.5


class InputError(ValueError):
    """Input from the page that cannot be run; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class Controls:
    """The page's inputs, in the order of the generate button's inputs."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    guidance: float | None = None  # None: 4 on the embedded model, 7.5 otherwise
    steps: int | None = None  # the baseline's steps; None: 20 on the embedded model, 50 otherwise
    preset: str = NO_PRESET
    sampler: str = KEEP_SAMPLER
    sampler_steps: int | None = None  # None: the baseline's steps
    schedule: str = "default"
    tuned_schedule: str = ""  # a name under the model's tuned_schedules/ or a JSON path
    cache: str = "none"
    cache_interval: int = 3  # a full step at least every this many steps
    block_cache_threshold: float = 0.1
    compile: str = "off"
    cuda_graph: bool = False
    channels_last: bool = False
    pruned_unet: str = ""  # a folder saved with save_pretrained (safetensors)
    lcm_lora: str = ""  # a .safetensors LoRA file or a folder holding one

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class Comparison:
    """One baseline / accelerated pair and what it measured."""

    baseline: object  # PIL images
    accelerated: object
    baseline_s: float
    accelerated_s: float
    baseline_steps: int
    accelerated_steps: int
    psnr_db: float
    ssim: float
    config: accel.AccelConfig
    label: str  # a short name of the config, for the plot
    notes: list[str] = field(default_factory=list)
    verdict: dict | None = None  # the CIFAR-10 classifier's labels, on the embedded model at 32x32
    first_call_s: float | None = None  # untimed warm-up of a compiled / graph-captured config
    # With the compile in the background: the first accelerated image's latency (eager, while compiling) and the
    # seconds from `accelerate` until the compiled code ran (compile, switch, graph capture)
    first_image_s: float | None = None
    compiled_after_s: float | None = None

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.accelerated_s if self.accelerated_s > 0 else math.inf


@dataclass
class FirstImage:
    """The first accelerated image while the compile runs in the background (eager), with the baseline."""

    baseline: object  # PIL images
    accelerated: object
    baseline_s: float
    accelerated_s: float


BACKGROUND_NOTE = ("torch.compile runs in the background (compile_background): the first accelerated image comes from "
                   "the eager path while it compiles; the latency is timed once the compiled code runs")
COMPILE_FAILED_NOTE = ("the background compile failed (the server log says why): the accelerated latency is of "
                       "the eager path of the module it was for")
COMPILE_UNFINISHED_NOTE = "a background compile was still pending after the timed call's warm-up: the latency is partly eager"
COMPILED_IN_THE_CALL_NOTE = ("the compiled modules hold another technique's hooks (a cache), so they compiled in "
                             "the first accelerated call, not in the background")
COMPILE_POLL_SECONDS = 0.25
COMPILE_ROUNDS = 4  # calls that may each start another module's waiting compile


def first_image_markdown(first: FirstImage) -> str:
    """What the page shows while the compile runs: the first image's latency, and that the timing follows."""
    return "\n".join([
        "| | baseline | accelerated |",
        "| --- | --- | --- |",
        f"| latency | {first.baseline_s:.2f} s | {first.accelerated_s:.2f} s (first image, eager) |",
        "",
        "Compiling in the background: the accelerated timing, PSNR and SSIM follow once the compiled code runs.",
    ])


def _as_int(name: str, value, *, accepted: str, allow_none: bool = True) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_none:
            return None
        raise InputError(f"{name} is empty; accepted: {accepted}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number; accepted: {accepted}") from None
    if not number.is_integer():
        raise InputError(f"{name}={value!r} is not a whole number; accepted: {accepted}")
    return int(number)


def _as_float(name: str, value, *, accepted: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number; accepted: {accepted}") from None
    if not math.isfinite(number):
        raise InputError(f"{name}={value!r} is not finite; accepted: {accepted}")
    return number


def _check_steps(name: str, steps: int | None) -> int | None:
    low, high = STEPS_RANGE
    if steps is not None and not low <= steps <= high:
        raise InputError(f"{name}={steps} is out of range; accepted: {low} to {high} steps")
    return steps


def _unusable_path(field: str, accepted: str) -> InputError:
    # One answer whether the path is missing, unreadable or holds the wrong files: the page must not tell
    # whoever opens it which paths exist on the server.
    return InputError(f"{field}: no usable file or folder at that path; accepted: {accepted}")


PRUNED_UNET_ACCEPTED = (
    "a folder saved with save_pretrained, holding config.json and *.safetensors weights (only safetensors weights are loaded)")
LCM_LORA_ACCEPTED = "a .safetensors LoRA file, or a folder holding pytorch_lora_weights.safetensors or one .safetensors file"


def _safetensors_folder(name: str, path: str) -> Path:
    """A `save_pretrained` folder whose weights are safetensors."""
    folder = Path(path).expanduser()
    try:
        usable = folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    except OSError:  # unreadable, or a name the file system refuses
        usable = False
    if not usable:
        raise _unusable_path(name, PRUNED_UNET_ACCEPTED)
    return folder


def prompted_class(prompt: str, classes) -> str | None:
    """The one CIFAR-10 class named in the prompt, or None when it names none or several."""
    named = [c for c in classes if re.search(rf"\b{re.escape(c)}s?\b", prompt.lower())]
    return named[0] if len(named) == 1 else None


class ComparisonApp:
    """One pipeline, chosen at start, and the baseline-vs-accelerated comparison on it."""

    def __init__(self, pipe, *, model_name: str, embedded: bool = False, model_dir: str | Path | None = None,
                 warmup: bool = True):
        from accel.embedded import EMBEDDED_GUIDANCE, EMBEDDED_STEPS  # it imports diffusers' pipelines: not at import

        self.pipe = pipe
        self.model_name = model_name
        self.embedded = embedded
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = pipe._execution_device
        self.lock = threading.Lock()
        self._classifier = None
        self.default_steps = EMBEDDED_STEPS if embedded else OTHER_STEPS
        self.default_guidance = EMBEDDED_GUIDANCE if embedded else OTHER_GUIDANCE
        unet = getattr(pipe, "unet", None)
        denoiser = unet if unet is not None else pipe.transformer  # SD 1.x/2.x/XL, or a DiT such as SD3
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.native_size = int(denoiser.config.sample_size) * self.vae_scale_factor
        # diffusers' SD pipelines take multiples of 8, DiT pipelines of a patch; the UNet needs a latent of
        # at least one pixel at its lowest level.
        patch = self.vae_scale_factor * (1 if unet is not None else denoiser.config.patch_size)
        self.size_multiple = math.lcm(8, patch)
        lowest = patch if unet is None else self.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.min_size = -(-lowest // self.size_multiple) * self.size_multiple
        self.max_size = 2 * self.native_size  # the app's limit: larger sizes are memory, not insight
        if warmup:  # one-time initialisation out of the first baseline's latency
            with torch.no_grad():
                self.pipe("", num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                          generator=torch.Generator("cpu").manual_seed(0))

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "auto", dtype: str | None = None, warmup: bool = True):
        """The embedded model (default), a local diffusers folder or a Hub id, safetensors weights only."""
        from diffusers import DiffusionPipeline

        from accel.embedded_dit import resolve_model
        from apps.loading import default_model, pick_device

        device = pick_device(device)
        if device.startswith("cuda"):
            # the page's presets compile in the background: their workers' server imports while the model loads
            from accel.runtime import start_compile_workers

            start_compile_workers()
        embedded = model is None
        path = default_model() if embedded else Path(resolve_model(model)).expanduser()
        local = embedded or path.exists() or str(model).startswith((".", "/", "~"))
        if local and not (path / "model_index.json").is_file():
            raise SystemExit(f"{path} is not a diffusers pipeline folder: no model_index.json in it")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
        extra = {"safety_checker": None, "requires_safety_checker": False} if embedded else {}
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path) if local else str(model), use_safetensors=True,
                                                     dtype=torch_dtype, **extra)
        except (OSError, ValueError) as err:
            raise SystemExit(f"could not load {model or path} with safetensors weights: {err}") from None
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        return cls(pipe, model_name="embedded CIFAR-10 model" if embedded else str(model), embedded=embedded,
                   model_dir=path if local else None, warmup=warmup)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def tuned_schedule_names(self) -> list[str]:
        folder = self.model_dir / "tuned_schedules" if self.model_dir is not None else None
        return sorted(p.stem for p in folder.glob("*.json")) if folder is not None and folder.is_dir() else []

    # --- input checks -------------------------------------------------------------------------

    def check_request(self, c: Controls) -> dict:
        """The baseline call's settings; raises InputError naming the bad input and what is accepted."""
        if not isinstance(c.prompt, str) or not c.prompt.strip():
            raise InputError("the prompt is empty; accepted: any text, e.g. 'a photo of a horse'")
        seed = _as_int("seed", c.seed, accepted="a whole number from 0 to 2**63 - 1")
        seed = 0 if seed is None else seed
        if not 0 <= seed < 2**63:
            raise InputError(f"seed={seed} is out of range; accepted: 0 to 2**63 - 1")
        size_text = (f"multiples of {self.size_multiple} from {self.min_size} to {self.max_size} "
                     f"(this model's native size is {self.native_size})")
        size = {}
        for name in ("height", "width"):
            value = _as_int(name, getattr(c, name), accepted=size_text)
            value = self.native_size if value is None else value
            if value % self.size_multiple or not self.min_size <= value <= self.max_size:
                raise InputError(f"{name}={value} is a size this model cannot take; accepted: {size_text}")
            size[name] = value
        guidance = _as_float("guidance", c.guidance, accepted="a number from 0 to 30")
        guidance = self.default_guidance if guidance is None else guidance
        if not 0 <= guidance <= 30:
            raise InputError(f"guidance={guidance} is out of range; accepted: a number from 0 to 30")
        steps = _check_steps("steps", _as_int("steps", c.steps, accepted=f"{STEPS_RANGE[0]} to {STEPS_RANGE[1]} steps"))
        call = {"prompt": c.prompt.strip(), "guidance_scale": guidance, "num_inference_steps": steps or self.default_steps,
                "seed": seed, **size}
        if c.negative_prompt and c.negative_prompt.strip():
            call["negative_prompt"] = c.negative_prompt.strip()
        return call

    def build_config(self, c: Controls, baseline_steps: int) -> tuple[accel.AccelConfig, list[str]]:
        """The `AccelConfig` the controls describe, and notes on what was changed or left out."""
        notes: list[str] = []
        model = self._model_change(c)
        if _is_lcm(model):
            # LCM-LoRA brings its own sampler, step count and guidance (it is distilled with CFG folded in).
            notes.append(f"LCM-LoRA samples with LCM in {model.num_steps} steps at guidance {model.guidance_scale:g} "
                         "(its own settings); the sampler controls and the preset were not used")
            config = accel.AccelConfig(model=model, cache=self._cache(c), runtime=self._runtime(c))
        elif c.preset and c.preset != NO_PRESET:
            if c.preset not in accel.preset_names():
                raise InputError(f"preset {c.preset!r} is unknown; accepted: {', '.join(accel.preset_names())}")
            config = accel.get_preset(c.preset)
            notes.append(f"preset '{c.preset}' sets the sampler, cache and runtime; their controls were not used")
        else:
            sampler = self._sampler(c, baseline_steps, notes)
            config = accel.AccelConfig(sampler=sampler, cache=self._cache(c), runtime=self._runtime(c))
        if model is not None and config.model is None:
            config = config.replace(model=model)
        config, note = without_gpu_only_runtime(config, self.device)
        if note is not None:
            notes.append(note)
        runtime = config.runtime
        if runtime is not None and runtime.compile == "full" and not runtime.compile_background:
            config = config.replace(runtime=replace(runtime, compile_background=True))
            notes.append(BACKGROUND_NOTE)
        if not config.items():
            notes.append("nothing is accelerated: both images come from the same pipeline and settings")
        return config, notes

    def _model_change(self, c: Controls):
        pruned, lora = (c.pruned_unet or "").strip(), (c.lcm_lora or "").strip()
        if pruned and lora:
            raise InputError("both a pruned UNet and an LCM-LoRA were given; accepted: one model change at a time "
                             "(both take the 'model' slot)")
        if pruned:
            import pruning

            folder = _safetensors_folder("pruned UNet", pruned)
            try:  # pruning's loader reads LAPTOP-Diff students as well as plain (BK-SDM) ones
                return accel.UNetSwapConfig(path=str(folder), loader=pruning.load_unet)
            except ValueError as err:
                raise InputError(f"pruned UNet: {err}") from None
        if lora:
            try:  # the config checks the path: a .safetensors file or a folder holding one
                return accel.LCMLoRAConfig(path=str(Path(lora).expanduser()))
            except (ValueError, OSError):
                raise _unusable_path("LCM-LoRA", LCM_LORA_ACCEPTED) from None
        return None

    def _sampler(self, c: Controls, baseline_steps: int, notes: list[str]):
        import samplers

        if not c.sampler or c.sampler == KEEP_SAMPLER:
            if c.schedule not in ("", "default") or (c.tuned_schedule or "").strip():
                notes.append(f"the schedule ({c.schedule}) belongs to a sampler; the model's own scheduler ran unchanged")
            return None
        if c.sampler not in samplers.SAMPLER_NAMES:
            raise InputError(f"sampler {c.sampler!r} is unknown; accepted: {', '.join(samplers.SAMPLER_NAMES)}")
        steps = _check_steps("sampler steps", _as_int("sampler steps", c.sampler_steps,
                                                      accepted=f"{STEPS_RANGE[0]} to {STEPS_RANGE[1]} steps"))
        steps = steps or baseline_steps
        options = {}
        if c.schedule == "tuned":
            name = (c.tuned_schedule or "").strip()
            available = self.tuned_schedule_names()
            if not name:
                raise InputError("schedule 'tuned' needs a tuned schedule; accepted: a JSON path"
                                 + (f" or one of {', '.join(available)}" if available else ""))
            try:
                tuned = samplers.load_tuned_schedule(name, self.model_dir)
            except (ValueError, OSError, KeyError, TypeError):  # TypeError, KeyError: a JSON file of another shape
                accepted = "a tuned-schedule JSON file saved by samplers.tune_schedule" + (
                    f", or one of {', '.join(available)}" if available else "")
                raise _unusable_path("tuned schedule", accepted) from None
            if tuned.num_steps != steps:
                notes.append(f"steps set to the tuned schedule's {tuned.num_steps}")
            if tuned.sampler != c.sampler:
                notes.append(f"the tuned schedule was searched for {tuned.sampler}, not {c.sampler}")
            steps, options = tuned.num_steps, {"tuned": name}
            if self.model_dir is not None:
                options["model_dir"] = str(self.model_dir)
        elif (c.tuned_schedule or "").strip():
            raise InputError(f"a tuned schedule was given with schedule {c.schedule!r}; accepted: schedule 'tuned' with it")
        try:
            return accel.SamplerConfig(c.sampler, num_steps=steps, schedule=c.schedule or "default", options=options)
        except ValueError as err:
            raise InputError(str(err)) from None

    def _cache(self, c: Controls):
        if not c.cache or c.cache == "none":
            return None
        if c.cache not in CACHE_CHOICES:
            raise InputError(f"cache {c.cache!r} is unknown; accepted: {', '.join(CACHE_CHOICES)}")
        interval = _as_int("cache interval", c.cache_interval, accepted="a whole number >= 1", allow_none=False)
        if interval < 1:
            raise InputError(f"cache interval={interval} is out of range; accepted: a whole number >= 1")
        try:
            if c.cache == "deepcache":
                return accel.DeepCacheConfig(cache_interval=interval)
            if c.cache == "encoder_propagation":
                return accel.EncoderPropagationConfig(key_interval=interval)
            threshold = _as_float("block cache threshold", c.block_cache_threshold, accepted="a number >= 0")
            return accel.BlockCacheConfig(threshold=0.1 if threshold is None else threshold,
                                          max_consecutive_cached=interval - 1 if interval > 1 else None)
        except ValueError as err:
            raise InputError(str(err)) from None

    def _runtime(self, c: Controls):
        if c.compile not in COMPILE_CHOICES:
            raise InputError(f"compile {c.compile!r} is unknown; accepted: {', '.join(COMPILE_CHOICES)}")
        compile_mode = None if c.compile == "off" else c.compile
        if compile_mode is None and not c.cuda_graph and not c.channels_last:
            return None
        return accel.RuntimeConfig(compile=compile_mode, cuda_graph=bool(c.cuda_graph), channels_last=bool(c.channels_last))

    # --- generation ---------------------------------------------------------------------------

    def _synchronize(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def _run(self, call: dict, steps: int, progress: Callable[[int, int], None] | None):
        kwargs = {k: v for k, v in call.items() if k != "seed"}
        kwargs["num_inference_steps"] = steps
        if progress is not None:
            def on_step_end(pipe, step_index, timestep, callback_kwargs):
                progress(step_index + 1, steps)
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step_end
        generator = torch.Generator("cpu").manual_seed(call["seed"])
        self._synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            images = self.pipe(**kwargs, generator=generator, output_type="pt").images
        self._synchronize()
        seconds = time.perf_counter() - start
        return (images.float().clamp(0, 1) * 255).round().to("cpu", torch.uint8), seconds

    def compare(self, controls: Controls, progress: Callable[[float, str], None] | None = None) -> Comparison:
        """Baseline, then accelerated, then restored: one request at a time on the shared pipeline."""
        result = None
        for kind, value in self.compare_steps(controls, progress):
            result = value if kind == "done" else result
        return result

    def compare_steps(self, controls: Controls, progress: Callable[[float, str], None] | None = None):
        """`compare` as it goes: yields ("first", FirstImage) where the compile runs in the background (the first
        accelerated image, from the eager path, before the compile ends), then ("done", Comparison). The pipeline
        is restored when the generator ends, or is closed before."""
        call = self.check_request(controls)
        config, notes = self.build_config(controls, call["num_inference_steps"])
        base_steps = call["num_inference_steps"]
        accel_call = dict(call)
        if _is_lcm(config.model):
            accel_steps = config.model.num_steps
            accel_call["guidance_scale"] = config.model.guidance_scale
        else:
            accel_steps = config.sampler.num_steps if config.sampler is not None else base_steps
        total = base_steps + accel_steps

        def report(phase: str, offset: int):
            if progress is None:
                return None
            return lambda i, n: progress(min(1.0, (offset + i) / total), f"{phase}: step {i} of {n}")

        first_image_s = compiled_after_s = None
        with self.lock:
            if accel.is_accelerated(self.pipe):  # left over from a crash in an earlier request
                accel.restore(self.pipe)
            baseline, baseline_s = self._run(call, base_steps, report("baseline", 0))
            try:
                applied = time.perf_counter()
                accel.accelerate(self.pipe, config)
            except ValueError as err:
                raise InputError(f"this config cannot be applied to {self.model_name}: {err}") from None
            try:
                first_call_s = None
                runtime = config.runtime
                if runtime is not None and runtime.compile_background:
                    first, seconds = self._run(accel_call, accel_steps,
                                               report("first image (compiling in the background)", base_steps))
                    if background_compiles(self.pipe) == "none":
                        # Another technique's hooks inside the compiled modules: they compiled in that call
                        first_call_s = seconds
                        notes.append(COMPILED_IN_THE_CALL_NOTE)
                    else:
                        first_image_s = seconds
                        yield "first", FirstImage(_to_pil(baseline[0]), _to_pil(first[0]), baseline_s, first_image_s)
                        first_call_s, state = self._until_compiled(accel_call, accel_steps, progress,
                                                                   at=(base_steps + accel_steps) / total)
                        if state == "idle":
                            compiled_after_s = time.perf_counter() - applied
                        else:  # the timing below is of the eager path, for some module at least: say so
                            notes.append(COMPILE_FAILED_NOTE if state == "failed" else COMPILE_UNFINISHED_NOTE)
                elif runtime is not None and (runtime.compile or runtime.cuda_graph):
                    # Compilation and graph capture happen on the first call: time the second.
                    _, first_call_s = self._run(accel_call, accel_steps, report("compiling / capturing", base_steps))
                accelerated, accelerated_s = self._run(accel_call, accel_steps, report("accelerated", base_steps))
            finally:
                accel.restore(self.pipe)
            verdict = self._verdict(call["prompt"], baseline, accelerated)
        if progress is not None:
            progress(1.0, "done")
        a, b = accelerated.float() / 255, baseline.float() / 255
        yield "done", Comparison(
            baseline=_to_pil(baseline[0]), accelerated=_to_pil(accelerated[0]), baseline_s=baseline_s,
            accelerated_s=accelerated_s, baseline_steps=base_steps, accelerated_steps=accel_steps,
            psnr_db=psnr(a, b).mean().item(), ssim=ssim(a, b).mean().item(), config=config, label=config_label(config),
            notes=notes, verdict=verdict, first_call_s=first_call_s, first_image_s=first_image_s,
            compiled_after_s=compiled_after_s,
        )

    def _until_compiled(self, call: dict, steps: int, progress: Callable[[float, str], None] | None,
                        at: float) -> tuple[float, str]:
        """Wait for the background compiles, then make the call that switches to the compiled code and captures its
        graphs; returns that call's seconds and where the compiles then stand (`background_compiles`: "idle" when
        all ran). A call that starts another module's compile (a signature that waited for the end of a call) is
        followed by another wait, a few rounds at most."""
        started = time.perf_counter()
        seconds = 0.0
        for _ in range(COMPILE_ROUNDS):
            while background_compiles(self.pipe) == "running":
                if progress is not None:
                    progress(at, f"compiling in the background: {time.perf_counter() - started:.0f} s")
                time.sleep(COMPILE_POLL_SECONDS)
            _, seconds = self._run(call, steps, None)
            state = background_compiles(self.pipe)
            if state in ("idle", "failed"):
                break
        return seconds, state

    def _verdict(self, prompt: str, baseline: torch.Tensor, accelerated: torch.Tensor) -> dict | None:
        """The CIFAR-10 classifier's label and confidence for both images (embedded model, 32x32 only)."""
        if not self.embedded or tuple(baseline.shape[-2:]) != (32, 32):
            return None
        from accel.embedded import CIFAR10_CLASSES
        from accel.quality import load_classifier

        if self._classifier is None:
            self._classifier = load_classifier(device="cpu")
        with torch.no_grad():
            probs = self._classifier(torch.cat([baseline, accelerated]).float() / 255).softmax(-1)
        confidence, labels = probs.max(-1)
        verdict = {"prompted": prompted_class(prompt, CIFAR10_CLASSES)}
        for name, i in (("baseline", 0), ("accelerated", 1)):
            verdict[name] = (CIFAR10_CLASSES[labels[i].item()], confidence[i].item())
        return verdict


def _is_lcm(model_config) -> bool:
    return isinstance(model_config, accel.LCMLoRAConfig)


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def config_label(config: accel.AccelConfig) -> str:
    """A short name of a config: each set slot's config type with its first field and its other non-default ones."""
    parts = []
    for _, sub in config.items():
        changed = [f"{f.name}={getattr(sub, f.name)!r}" for i, f in enumerate(fields(sub))
                   if i == 0 or (getattr(sub, f.name) != f.default and f.name != "options")]
        parts.append(f"{type(sub).__name__.removesuffix('Config')}({', '.join(changed)})")
    return " + ".join(parts) or "no acceleration"


def numbers_markdown(result: Comparison) -> str:
    """The comparison's numbers as a markdown table, with the notes under it."""
    identical = math.isinf(result.psnr_db)
    psnr_text = "identical" if identical else f"{result.psnr_db:.2f} dB"
    lines = [
        "| | baseline | accelerated |",
        "| --- | --- | --- |",
        f"| latency | {result.baseline_s:.2f} s | {result.accelerated_s:.2f} s |",
        f"| steps | {result.baseline_steps} | {result.accelerated_steps} |",
        f"| speed-up | 1.00x | **{result.speedup:.2f}x** |",
        f"| PSNR to baseline | - | **{psnr_text}** |",
        f"| SSIM to baseline | - | {result.ssim:.4f} |",
    ]
    if result.verdict is not None:
        prompted = result.verdict["prompted"]

        def cell(name: str) -> str:
            label, confidence = result.verdict[name]
            mark = "" if prompted is None else (" (the prompted class)" if label == prompted else f" (prompted: {prompted})")
            return f"{label}, {confidence:.0%}{mark}"

        lines.append(f"| classifier | {cell('baseline')} | {cell('accelerated')} |")
    if result.first_image_s is not None:
        lines.append(f"| first image (eager, compiling in the background) | - | {result.first_image_s:.2f} s |")
    if result.compiled_after_s is not None:
        lines.append(f"| compiled code running after | - | {result.compiled_after_s:.2f} s |")
    if result.first_call_s is not None:
        label = "first compiled call (graph capture)" if result.compiled_after_s is not None else "first call (compile / capture)"
        lines.append(f"| {label} | - | {result.first_call_s:.2f} s |")
    lines += ["", f"Config: `{result.label}`"]
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines)


def generate_outputs(app: ComparisonApp, controls: Controls, measured: list, live: list, progress=None) -> tuple:
    """What the generate button shows: both images, the numbers, the plot with this run added, the front
    table, and the session's runs so far (the latest first becomes an earlier run on the next call)."""
    outputs = None
    for kind, value in generate_steps(app, controls, measured, live, progress):
        outputs = value if kind == "done" else outputs
    return outputs


def generate_steps(app: ComparisonApp, controls: Controls, measured: list, live: list, progress=None):
    """`generate_outputs` as it goes: ("first", (baseline image, first accelerated image, numbers)) while the
    compile runs in the background, then ("done", the outputs)."""
    from apps import pareto

    for kind, value in app.compare_steps(controls, progress=progress):
        if kind == "first":
            yield "first", (value.baseline, value.accelerated, first_image_markdown(value))
            continue
        result = value
        series = pareto.live_series(app.device.type)
        earlier = [replace(p, series=series[1]) for p in live]
        live = earlier + [pareto.live_point(result.label, result.speedup, result.psnr_db, result.ssim,
                                            app.device.type)]
        points = pareto.mark_front(measured + live)
        yield "done", (result.baseline, result.accelerated, numbers_markdown(result), pareto.frame(points, series),
                       pareto.front_table(points), live)


# --- the page -----------------------------------------------------------------------------------

CSS = """
/* small outputs (32x32 on the embedded model) shown large, pixels kept sharp */
#baseline-image img, #accelerated-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""


def build_app(app: ComparisonApp, results_dir: str | Path | None = None):
    """The Gradio Blocks of the app (not launched)."""
    import gradio as gr
    import samplers

    from apps import pareto

    measured = pareto.load_points(results_dir)
    gpu_note = None if app.on_gpu else f"needs a CUDA GPU; this app runs on {app.device.type}"
    tuned = app.tuned_schedule_names()


    with gr.Blocks(title="diffusion-accel: speed vs quality") as demo:
        gr.Markdown(
            f"# diffusion-accel: what each acceleration costs and gives\n"
            f"Model: **{app.model_name}** on **{app.device}**. The same prompt and seed run unaccelerated (baseline) "
            f"and accelerated; PSNR and SSIM compare the accelerated image to the baseline."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", value="", placeholder="a photo of a horse", elem_id="prompt")
                negative_prompt = gr.Textbox(label="negative prompt", value="")
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0)
                    guidance = gr.Number(label="guidance", value=app.default_guidance)
                    steps = gr.Number(label="baseline steps", value=app.default_steps, precision=0, elem_id="steps")
                with gr.Row():
                    height = gr.Number(label="height", value=app.native_size, precision=0, elem_id="height")
                    width = gr.Number(label="width", value=app.native_size, precision=0, elem_id="width")
                preset = gr.Dropdown([NO_PRESET, *accel.preset_names()], value=NO_PRESET, label="preset",
                                     info="a named preset overrides the sampler, cache and runtime controls",
                                     elem_id="preset")
                with gr.Accordion("sampler", open=True):
                    with gr.Row():
                        sampler = gr.Dropdown([KEEP_SAMPLER, *samplers.SAMPLER_NAMES], value="dpmpp_2m", label="sampler",
                                              elem_id="sampler")
                        sampler_steps = gr.Number(label="sampler steps", value=12, precision=0, elem_id="sampler-steps")
                        schedule = gr.Dropdown([s for s in samplers.SCHEDULE_NAMES if s != "explicit"], value="karras",
                                               label="schedule", elem_id="schedule")
                    tuned_schedule = gr.Textbox(
                        label="tuned schedule", value="",
                        placeholder="with schedule 'tuned': " + (", ".join(tuned) if tuned else "a JSON path from samplers.tune_schedule"),
                    )
                with gr.Accordion("feature cache", open=True):
                    with gr.Row():
                        cache = gr.Dropdown(list(CACHE_CHOICES), value="none", label="cache", elem_id="cache")
                        cache_interval = gr.Number(label="cache interval", value=3, precision=0,
                                                   info="a full UNet step at least every N steps")
                        block_cache_threshold = gr.Number(label="block cache threshold", value=0.1)
                with gr.Accordion("runtime", open=False):
                    with gr.Row():
                        compile_mode = gr.Dropdown(list(COMPILE_CHOICES), value="off", label="torch.compile",
                                                   info=gpu_note, interactive=app.on_gpu)
                        cuda_graph = gr.Checkbox(label="CUDA graphs", value=False, info=gpu_note, interactive=app.on_gpu)
                        channels_last = gr.Checkbox(label="channels-last", value=False)
                with gr.Accordion("model changes (one at a time)", open=False):
                    pruned_unet = gr.Textbox(label="pruned UNet folder", placeholder="saved with save_pretrained, safetensors")
                    lcm_lora = gr.Textbox(label="LCM-LoRA weights", placeholder="a .safetensors file or its folder")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    baseline_image = gr.Image(label="baseline", type="pil", interactive=False, format="png",
                                              elem_id="baseline-image", height=320)
                    accelerated_image = gr.Image(label="accelerated", type="pil", interactive=False, format="png",
                                                 elem_id="accelerated-image", height=320)
                numbers = gr.Markdown("Press Generate to compare.", elem_id="numbers")
        plot = gr.ScatterPlot(
            pareto.frame(measured, pareto.live_series(app.device.type)), x="speedup", y="psnr_db", color="series",
            color_map=pareto.color_map(measured, app.device.type),
            tooltip=["series", "config", "speedup", "psnr_db", "on_front"],
            x_title="speed-up over the baseline of the same measurement set",
            y_title=f"PSNR to baseline (dB; identical drawn at {pareto.PSNR_CAP_DB:.0f})",
            title="speed vs quality: each colour one measurement set (speed-ups compare within a set)",
            height=420, elem_id="pareto-plot",
            # gradio's legend is one row that runs off the right edge, and a caption is clipped under the x-axis title:
            # the legend below wraps, and names this app's runs (red, black) first
            colors_in_legend=[],
        )
        gr.HTML(pareto.legend_html(measured, app.device.type), elem_id="pareto-legend")
        front = gr.Dataframe(
            pareto.front_table(measured), headers=["measurement set", "config", "speed-up", "PSNR (dB)"],
            label="Pareto front: configs no other of their set beats on both speed-up and PSNR",
            interactive=False, elem_id="pareto-front", column_widths=["32%", "38%", "15%", "15%"],
            max_height=460,
        )
        history = gr.State([])

        inputs = [prompt, negative_prompt, seed, height, width, guidance, steps, preset, sampler, sampler_steps, schedule,
                  tuned_schedule, cache, cache_interval, block_cache_threshold, compile_mode, cuda_graph, channels_last,
                  pruned_unet, lcm_lora]
        assert len(inputs) == len(Controls.names())

        def on_generate(*values, progress=gr.Progress()):
            # An error leaves the previous run's outputs in place (a raised gr.Error would turn each into an
            # "Error" box) and says in the status line what was wrong and that those outputs are older.
            *controls, live = values
            try:
                for kind, outputs in generate_steps(app, Controls(*controls), measured, live,
                                                    lambda f, d: progress(f, desc=d)):
                    if kind == "first":  # the images and a first number, while the compile runs
                        yield (*outputs, *[gr.skip()] * 3, "First image shown; compiling in the background.")
                    else:
                        yield (*outputs, "")
                return
            except InputError as err:
                message = f"**Cannot generate:** {err}"
            except Exception as err:  # the page gets the message; the log gets the traceback
                logger.exception("generation failed")
                message = f"**Generation failed:** {type(err).__name__}: {err}"
            if live:
                message += "  \nThe images, numbers and plot below are from the previous run."
            yield (*[gr.skip()] * 6, message)

        generate.click(
            on_generate, inputs=[*inputs, history],
            outputs=[baseline_image, accelerated_image, numbers, plot, front, history, status],
            concurrency_limit=1, concurrency_id="generate", api_name="generate",
        )
    return demo


def launch(app: ComparisonApp, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT,
           results_dir: str | Path | None = None, max_queue: int = 32, prevent_thread_lock: bool = False):
    """Build and serve the page: on 127.0.0.1 unless another host is given, one generation at a time."""
    demo = build_app(app, results_dir)
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    demo.launch(server_name=host, server_port=port, show_error=False, css=CSS, footer_links=[],
                prevent_thread_lock=prevent_thread_lock, quiet=False)
    return demo


def run(args) -> int:
    """`accel app`: load the model given at start, then serve the page until interrupted."""
    app = ComparisonApp.load(args.model, device=args.device, dtype=args.dtype)
    launch(app, host=args.host, port=args.port, results_dir=args.results)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m apps.gradio_app [options]`: the same as `accel app [options]`."""
    parser = argparse.ArgumentParser(prog="accel app")
    add_app_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
