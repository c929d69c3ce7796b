"""Compiled runtime: attention backend, channels-last, reduced precision, 8-bit matmuls, torch.compile, CUDA graphs.

Stable Diffusion UNets at batch 1-2 are bound by kernel launches on H100-class GPUs; replaying a
captured CUDA graph (and compiling the blocks first) removes most of that overhead. The same steps run
on DiT transformers (PixArt, SD3, Flux, Sana): regional compilation compiles their repeated blocks,
CUDA graphs capture the transformer's calls, keyed on the session's plan of each call as for UNets.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import NotAcceleratedError, UnsupportedPipelineError, check_choice
from ..pipelines import denoiser, denoiser_kind
from ..session import get_session
from .artifacts import ArtifactCache
from .attention import ATTENTION_CHOICES, apply_attention, apply_fused_qkv, remove_attention, remove_fused_qkv
from .compile import _hook as _compile_hook
from .compile import (apply_compile, background_compile_report, background_state, first_call_seconds, precompile_report,
                      remove_compile)
from .cuda_graph import apply_cuda_graph, get_cuda_graph_hook, remove_cuda_graph
from .lora_hotswap import LoRAHotswap
from .precompile import prestart as _prestart
from .quantize import DEFAULT_SKIP, FORMATS, QuantizedLayers

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPILE_MODES = (None, "regional", "full")
QUANTIZE_CHOICES = (None, *FORMATS)
# The denoiser goes by its generic name or by its kind; "unet" / "transformer" must match the pipeline's.
DENOISER_COMPONENTS = ("denoiser", "unet", "transformer")
COMPONENTS = (*DENOISER_COMPONENTS, "vae", "text_encoder")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

__all__ = [
    "RUNTIME_STEPS",
    "Runtime",
    "RuntimeConfig",
    "RuntimeStep",
    "apply_cuda_graph",
    "remove_cuda_graph",
    "get_cuda_graph_hook",
    "apply_compile",
    "remove_compile",
    "first_call_seconds",
    "background_compile_report",
    "background_compiles",
    "precompile_report",
    "quantize_report",
    "compile_cache_report",
    "swap_lora",
    "set_lora_scale",
    "start_compile_workers",
]


def start_compile_workers() -> None:
    """Start the compile workers' server ahead of `accelerate()`: a process that imports torch, inductor, diffusers and
    accel once (7-10 s on the H200's hosts from bytecode, ~21 s where it compiles their source first; see
    `process.bytecode_environment`) and forks the background compile's workers (`compile_background` on a CUDA GPU).
    `accelerate()` starts it otherwise; started while the pipeline loads, its imports are over sooner. The app calls
    it before loading a model onto a CUDA GPU; a no-op where it runs already or the platform cannot fork."""
    _prestart()


@dataclass(frozen=True)
class RuntimeConfig:
    """How the denoiser runs. The defaults change nothing.

    attention: "default" (as loaded), "sdpa" (PyTorch picks the kernel), "flash", "efficient", "math", "cudnn" (SDPA
        pinned to one kernel, entered in every attention module so that compiled graphs record it) or "xformers".
    fuse_qkv: fuse the q/k/v projections of every attention of the denoiser into one matmul (diffusers'
        `fuse_qkv_projections`, which UNets and the PixArt, SD3 and Flux transformers have); needs SDPA attention.
    channels_last: NHWC memory format for the denoiser's convolutions (and ControlNet's); with the denoiser compiled
        in the background, converted at the end of the first call, just before that compile starts.
    dtype: cast every pipeline module to "float16" / "bfloat16" / "float32"; the original weights
        are kept on the CPU so `restore` is exact.
    quantize: None, "fp8" (E4M3 weights and activations with row-wise scales, `torch._scaled_mm`: CUDA compute
        capability >= 8.9) or "int8" (the same in INT8, `torch._int_mm`: for GPUs without FP8), on the denoiser's
        linear layers but the sensitive ones (`accel.runtime.quantize`).
    quantize_skip: module-name patterns (fnmatch, e.g. "*.norm1.linear") of the denoiser's layers to leave in 16 bit;
        None: the default sensitive set for UNets or DiTs (`accel.runtime.quantize.DEFAULT_SKIP`), () quantizes all.
    quantize_convs: also quantize the 1x1 convolutions (as matmuls over the pixels).
    quantize_min_out_features: leave layers with fewer output features than this in 16 bit (None or 0: every
        aligned layer). The per-row quantize of a layer's input costs a pass over it, which a narrow layer's 8-bit
        matmul does not win back: on the H200 FP8 lost on every measured layer of <= 2,560 outputs and won on every
        one of >= 3,072 (`benchmarks/runtime/fp8_linear.py`), so 3072 keeps only the layers where FP8 pays.
    compile: None, "regional" (repeated blocks, short compile) or "full".
    compile_workers: with "regional", how many worker processes compile the distinct blocks alongside
        the first call (None: half the host's cores, at most 8; 0: all in this process). With "full" and
        `compile_background`, whether worker processes compile each component first (None: on a CUDA GPU; 0: the
        thread compiles it all; 1: always): a UNet or VAE decoder stage by stage, each stage's forward compiled whole
        in parallel processes (up to `compile_workers=None`'s count) and loaded here without a trace (without
        `compile_cache`); any other module in one process, the thread here then tracing and reading its cache entries.
    compile_background: with "full", the first call of each new input signature starts its compile in a thread and
        runs eagerly, as do the calls after it, until the compiled code is built; the next call then runs it (and CUDA
        graphs capture then: none is captured while a background compile runs). A first image comes at the eager
        speed instead of after the whole compile. A module with another technique's hooks inside compiles in the call.
        With `compile_cache`, matching artifacts load at the first call as without it (the background compile then
        reads them), and what a background compile built is saved at the end of the first call after it is over.
    compile_options: inductor settings for the compile (`torch._inductor.config` names, e.g.
        {"pattern_matcher": False}; as torch.compile's `options`), kept as sorted (name, value) pairs; None: torch's own.
        The UNet presets turn off what cost compile time without buying speed (`accel.presets`).
    compile_cache: a folder of portable compile artifacts (`accel.runtime.artifacts`, written by `accel precompile`
        or by an earlier process): each call with new shapes first loads the artifacts saved for this model, config,
        shapes, torch and device, and where none match saves them once it has compiled. None: not used.
    cuda_graph: capture calls as CUDA graphs; eager where capture fails.
    lora_hotswap: prepare the denoiser's LoRA, loaded before `accelerate`, so that `swap_lora` (another LoRA into its
        slot) and `set_lora_scale` change it in place: no recompilation, no new CUDA graphs (`accel.runtime.lora_hotswap`).
    lora_max_rank: the highest rank of the LoRAs to swap in (the loaded one is padded to it with zeros); None: the
        loaded LoRA's rank.
    components: which modules `compile` and `cuda_graph` cover: "denoiser" (the UNet or DiT transformer,
        with ControlNet; "unet" / "transformer" name it by kind), "vae" (the decoder) and "text_encoder"
        (every text encoder of the pipeline).
    compile_components: the ones of `components` that `compile` covers (None: all of them); the others get CUDA
        graphs alone, which capture in well under a second where a compile takes many (the text encoders run once
        per image: their compile bought little and cost 14 s of SD1.5's cold start).
    On a DiT the attention processors are the model's own (SDPA already): "sdpa" keeps them and the pinned
    kernels run them under `sdpa_kernel`; "xformers" is for UNets.
    """

    attention: str = "default"
    fuse_qkv: bool = False
    channels_last: bool = False
    dtype: str | None = None
    quantize: str | None = None
    quantize_skip: tuple[str, ...] | None = None
    quantize_convs: bool = False
    quantize_min_out_features: int | None = None
    compile: str | None = None
    compile_workers: int | None = None
    compile_background: bool = False
    compile_options: tuple[tuple[str, object], ...] | None = None
    compile_cache: str | None = None
    cuda_graph: bool = False
    lora_hotswap: bool = False
    lora_max_rank: int | None = None
    components: tuple[str, ...] = ("denoiser",)
    compile_components: tuple[str, ...] | None = None

    def __post_init__(self):
        check_choice("RuntimeConfig.attention", self.attention, ATTENTION_CHOICES)
        check_choice("RuntimeConfig.dtype", self.dtype, (None, *DTYPES))
        check_choice("RuntimeConfig.compile", self.compile, COMPILE_MODES)
        check_choice("RuntimeConfig.quantize", self.quantize, QUANTIZE_CHOICES)
        for name in ("fuse_qkv", "channels_last", "quantize_convs", "compile_background", "cuda_graph", "lora_hotswap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RuntimeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.compile_workers is not None:
            if isinstance(self.compile_workers, bool) or not isinstance(self.compile_workers, int) or self.compile_workers < 0:
                raise ValueError(f"RuntimeConfig.compile_workers must be None (automatic) or an integer >= 0, "
                                 f"got {self.compile_workers!r}")
            if self.compile != "regional" and not self.compile_background:
                raise ValueError(f"RuntimeConfig.compile_workers applies to compile='regional', or to 'full' with "
                                 f"compile_background=True; compile is {self.compile!r}")
            if self.compile_background and self.compile_workers > 1:
                raise ValueError(f"RuntimeConfig.compile_workers with compile_background is 0 or 1 (one worker per "
                                 f"component), got {self.compile_workers}")
        if self.compile_options is not None:
            object.__setattr__(self, "compile_options", _inductor_options(self.compile_options))
            if self.compile is None:
                raise ValueError("RuntimeConfig.compile_options applies to compile='regional' or 'full'; compile is None")
        if self.compile_background:
            if self.compile != "full":
                raise ValueError(f"RuntimeConfig.compile_background applies to compile='full'; compile is {self.compile!r}")
        if self.lora_max_rank is not None:
            if isinstance(self.lora_max_rank, bool) or not isinstance(self.lora_max_rank, int) or self.lora_max_rank < 1:
                raise ValueError(f"RuntimeConfig.lora_max_rank must be None (the loaded LoRA's rank) or a positive integer, "
                                 f"got {self.lora_max_rank!r}")
            if not self.lora_hotswap:
                raise ValueError("RuntimeConfig.lora_max_rank applies to lora_hotswap=True; lora_hotswap is False")
        if self.compile_cache is not None:
            if not isinstance(self.compile_cache, (str, os.PathLike)) or not os.fspath(self.compile_cache):
                raise ValueError(f"RuntimeConfig.compile_cache must be None or a folder path, got {self.compile_cache!r}")
            if self.compile is None:
                raise ValueError("RuntimeConfig.compile_cache holds compiled code and applies to compile='regional' or "
                                 "'full'; compile is None")
            object.__setattr__(self, "compile_cache", os.fspath(self.compile_cache))
        if self.quantize_skip is not None:
            if isinstance(self.quantize_skip, str) or not all(isinstance(p, str) for p in self.quantize_skip):
                raise ValueError(f"RuntimeConfig.quantize_skip must be None (the default sensitive layers) or a tuple of "
                                 f"module-name patterns such as ('*.norm1.linear',), got {self.quantize_skip!r}")
            object.__setattr__(self, "quantize_skip", tuple(self.quantize_skip))
        minimum = self.quantize_min_out_features
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0):
            raise ValueError(f"RuntimeConfig.quantize_min_out_features must be None or an integer >= 0 (a layer's "
                             f"output features), got {minimum!r}")
        if self.quantize is None and (self.quantize_skip is not None or self.quantize_convs or minimum):
            raise ValueError("RuntimeConfig.quantize_skip, quantize_convs and quantize_min_out_features apply to "
                             "quantize='fp8' or 'int8'; quantize is None")
        if isinstance(self.components, str) or not self.components:
            raise ValueError(f"RuntimeConfig.components must be a non-empty tuple from {COMPONENTS}, got {self.components!r}")
        for component in self.components:
            check_choice("RuntimeConfig.components item", component, COMPONENTS)
        object.__setattr__(self, "components", tuple(self.components))
        if self.compile_components is not None:
            if isinstance(self.compile_components, str) or not self.compile_components:
                raise ValueError(f"RuntimeConfig.compile_components must be None (all components) or a non-empty tuple "
                                 f"from components={self.components!r}, got {self.compile_components!r}")
            outside = [c for c in self.compile_components if c not in self.components]
            if outside:
                raise ValueError(f"RuntimeConfig.compile_components names {outside[0]!r}, which is not in "
                                 f"components={self.components!r}: compile covers some of the components")
            if self.compile is None:
                raise ValueError("RuntimeConfig.compile_components applies to compile='regional' or 'full'; compile "
                                 "is None")
            object.__setattr__(self, "compile_components", tuple(self.compile_components))

    @property
    def compiled_components(self) -> tuple[str, ...]:
        return self.components if self.compile_components is None else self.compile_components

    def without_compile(self, cuda_graph: bool | None = None) -> "RuntimeConfig":
        """This config without torch.compile and the settings that go with it (`cuda_graph`: also set that)."""
        return dataclasses.replace(self, compile=None, compile_components=None, compile_background=False,
                                   compile_cache=None, compile_workers=None, compile_options=None,
                                   cuda_graph=self.cuda_graph if cuda_graph is None else cuda_graph)

    @property
    def covers_denoiser(self) -> bool:
        return any(c in DENOISER_COMPONENTS for c in self.components)


def _denoisers(pipe) -> list[torch.nn.Module]:
    nets = [denoiser(pipe)]
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, torch.nn.Module):
        nets.append(controlnet)
    return nets


def background_compiles(pipe) -> str:
    """Where the background compiles (`compile_background`) of the pipeline stand: "running" while one runs,
    "waiting" where none runs but a module's new input signature waits for the end of a pipeline call to start its
    compile (the next call starts it), "failed" where neither and a compile failed (that module runs eagerly; the
    log says why), "idle" where all are done, and "none" where no module compiles in the background (no
    `compile_background`, or every compiled module found another technique's hooks inside it at its first call and
    compiled in that call). A caller that wants the compiled code (the app, before it times the accelerated
    pipeline) waits while "running" and makes a call on "waiting"."""
    states = {background_state(m) for c in pipe.components.values() if isinstance(c, torch.nn.Module)
              for m in c.modules()} - {None}
    return next((s for s in ("running", "waiting", "failed", "idle") if s in states), "none")


def _inductor_options(options) -> tuple[tuple[str, object], ...]:
    """`RuntimeConfig.compile_options` checked against this torch's inductor settings, as sorted (name, value) pairs."""
    try:
        pairs = dict(options).items()
    except (TypeError, ValueError):
        raise ValueError(f"RuntimeConfig.compile_options must be None or a dict of inductor settings such as "
                         f"{{'pattern_matcher': False}}, got {options!r}") from None
    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    for name, value in pairs:
        if name not in known:
            raise ValueError(f"RuntimeConfig.compile_options names {name!r}, which is not an inductor setting of torch "
                             f"{torch.__version__}; accepted: the names in torch._inductor.config, e.g. "
                             "'pattern_matcher', 'triton.autotune_pointwise', 'max_autotune'")
        if known[name] is not None and value is not None and type(value) is not type(known[name]):
            raise ValueError(f"RuntimeConfig.compile_options[{name!r}] is a {type(known[name]).__name__} in torch "
                             f"{torch.__version__}, got {value!r}")
    return tuple(sorted(pairs))


def _modules(pipe, components: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules that compile / CUDA-graph settings cover."""
    kind = denoiser_kind(pipe)
    named = [c for c in components if c in ("unet", "transformer") and c != kind]
    if named:
        raise UnsupportedPipelineError(f"RuntimeConfig.components names {named[0]!r}, but the denoiser of "
                                       f"{type(pipe).__name__} is a {kind}; name it {kind!r} or 'denoiser'")
    modules = []
    if any(c in DENOISER_COMPONENTS for c in components):
        modules += _denoisers(pipe)
    if "vae" in components and getattr(pipe, "vae", None) is not None:
        modules.append(pipe.vae.decoder)  # decode() is not forward(): hook the decoder it calls
    if "text_encoder" in components:
        modules += [m for name in TEXT_ENCODERS if isinstance(m := getattr(pipe, name, None), torch.nn.Module)]
    return modules


def _cast(pipe, dtype: torch.dtype) -> dict:
    """Cast every module of the pipeline, keeping the original tensors (on the CPU) for restore."""
    saved = {}
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                saved[(name, key)] = (tensor, tensor.data.to("cpu", copy=True), tensor.device)
                tensor.data = tensor.data.to(dtype)
    return saved


def _uncast(pipe, saved: dict) -> None:
    for tensor, original, device in saved.values():
        tensor.data = original.to(device)


class _ChannelsLast:
    """The denoisers' 4-D weights in NHWC, and what converts them back exactly (the ones that were contiguous).

    With the denoiser's compile in the background the conversion waits for the end of the first pipeline call, just
    before that compile starts (the call-end listener registered first runs first): the first image runs on the
    weights as loaded. Eager NHWC convolutions cost a fresh process their cuDNN start-up and run slower (H200, SD1.5
    512 px, first image eager: 2.0 s with channels-last, 1.4 s without; `balanced` + `compile_background`: 3.2 s
    with it, 1.6 s without; benchmarks/results/runtime/first-image/). Converting before the compile traces keeps the
    compiled code, its artifacts' keys and its steady state those of the preset as it is. No CUDA graph of the
    denoiser is captured before then (its compile is pending), so none holds the old weights."""

    def __init__(self, pipe, config: RuntimeConfig, session):
        self.nets, self.changed, self.session = _denoisers(pipe), [], None
        deferred = config.compile_background and any(c in DENOISER_COMPONENTS for c in config.compiled_components)
        if deferred and session is not None:
            self.session = session
            session.add_call_end_listener(self._at_call_end)
        else:
            self.convert()

    def convert(self) -> None:
        for net in self.nets:
            for param in net.parameters():
                if param.dim() == 4 and param.is_contiguous():
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
                    self.changed.append(param)

    def _at_call_end(self, session, completed: bool) -> None:
        self._stop_waiting()
        self.convert()

    def _stop_waiting(self) -> None:
        if self.session is not None:
            self.session.remove_call_end_listener(self._at_call_end)
            self.session = None

    def remove(self) -> None:
        self._stop_waiting()
        for param in self.changed:
            param.data = param.data.contiguous()
        self.changed = []


def _on_each(modules: list[torch.nn.Module], apply, remove) -> list[torch.nn.Module]:
    """`apply(module)` on every module; if one fails, those done are undone before the error propagates."""
    done = []
    try:
        for module in modules:
            apply(module)
            done.append(module)
    except BaseException:
        for module in reversed(done):
            remove(module)
        raise
    return done


def _quantize(pipe, config: RuntimeConfig, session) -> QuantizedLayers:
    skip = DEFAULT_SKIP[denoiser_kind(pipe)] if config.quantize_skip is None else config.quantize_skip
    return QuantizedLayers(denoiser(pipe), config.quantize, skip, config.quantize_convs,
                           config.quantize_min_out_features or 0)


def _applied(pipe, step_name: str):
    """What runtime step `step_name` returned on the accelerated `pipe`; None where it is not applied."""
    session = get_session(pipe)
    runtime = None if session is None else session.state.get("runtime")
    return next((state for step, state in getattr(runtime, "applied", ()) if step.name == step_name), None)


def quantize_report(pipe) -> dict[str, list[str]] | None:
    """The denoiser layers `RuntimeConfig(quantize=...)` quantized on the accelerated `pipe` and those it left in 16
    bit, by reason ("skipped", "unaligned", "narrow", "adapter_variant"); None where nothing is quantized."""
    layers = _applied(pipe, "quantize")
    return None if layers is None else layers.report


def compile_cache_report(pipe) -> dict[str, list[str]] | None:
    """The artifact files `RuntimeConfig(compile_cache=...)` loaded and saved on the accelerated `pipe` so far
    ({"loaded": [...], "saved": [...]}); None where no compile cache is set."""
    cache = _applied(pipe, "compile_cache")
    return None if cache is None else {"loaded": list(cache.loaded), "saved": [str(p) for p in cache.saved]}


def _hotswap(pipe) -> LoRAHotswap:
    hotswap = _applied(pipe, "lora_hotswap")
    if hotswap is None:
        if get_session(pipe) is None:
            raise NotAcceleratedError(f"this {type(pipe).__name__} is not accelerated; outside accel, swap with "
                                      "pipe.load_lora_weights(..., hotswap=True)")
        raise RuntimeError("this pipeline was accelerated without RuntimeConfig(lora_hotswap=True), so its compiled code "
                           "and CUDA graphs hold the LoRA as it was: accel.restore(pipe), then accelerate again with "
                           "RuntimeConfig(lora_hotswap=True, lora_max_rank=...) after loading the first LoRA")
    return hotswap


def swap_lora(pipe, lora, *, adapter_name: str | None = None, scale: float = 1.0, **kwargs) -> None:
    """Load `lora` (what `pipe.load_lora_weights` takes: a path, a Hub id or a state dict; `kwargs` go with it) into
    the slot of adapter `adapter_name` (None: the one loaded) of a pipeline accelerated with
    `RuntimeConfig(lora_hotswap=True)`, in place, at weight `scale`: the next call runs the compiled code and CUDA
    graphs it ran before. Refused before anything changes: a rank above `lora_max_rank`, a layer the loaded LoRA
    does not adapt, a text-encoder part."""
    _hotswap(pipe).swap(lora, adapter_name, scale, **kwargs)


def set_lora_scale(pipe, scale: float, *, adapter_name: str | None = None) -> None:
    """The weight of the swappable LoRA (as diffusers' `set_adapters`), in place: `set_adapters` would put Python
    floats back into the scales, which recompiles and which CUDA graphs already captured do not see."""
    _hotswap(pipe).set_scale(scale, adapter_name)


def _compile(pipe, config: RuntimeConfig, session) -> tuple[list[torch.nn.Module], Callable | None]:
    """The compiled modules, and the session's call-end listener that starts their background compiles (or None)."""
    options = {"workers": config.compile_workers} if config.compile == "regional" or config.compile_background else {}
    if config.compile_options:
        options["options"] = dict(config.compile_options)
    if config.compile_background:
        # Stage by stage in worker processes, unless artifacts are to be saved: the stages' compiled forwards live in
        # the workers' files, and torch's portable cache of this process would hold none of them.
        options.update(background=True, stages=config.compile_cache is None)
    modules = _on_each(_modules(pipe, config.compiled_components), lambda m: apply_compile(m, config.compile, **options),
                       remove_compile)
    if config.compile_background:
        # The background compiles start when the first pipeline call ends: a thread compiling beside the first
        # image held it up (SD1.5 on the H200: 14.4 s, where stock diffusers makes that image in 0.68 s).
        backgrounds = [b for b in (getattr(_compile_hook(m), "background", None) for m in modules) if b is not None]
        for background in backgrounds:
            background.defer()

        def start(session, completed: bool) -> None:
            for background in backgrounds:
                background.start_deferred()
            session.remove_call_end_listener(start)

        session.add_call_end_listener(start)
        return modules, start
    return modules, None


def _uncompile(pipe, compiled: tuple[list[torch.nn.Module], Callable | None]) -> None:
    modules, start = compiled
    session = get_session(pipe)
    if session is not None and start is not None:
        session.remove_call_end_listener(start)
    for module in modules:
        remove_compile(module)


def _capture_graphs(pipe, config: RuntimeConfig, session) -> list[torch.nn.Module]:
    """CUDA graphs of the covered modules; the denoiser's graphs are keyed on the session's plan of each call."""
    if config.covers_denoiser:
        session.planner(denoiser(pipe))  # binds each call's arguments once and plans it, for its graph hook
    return _on_each(_modules(pipe, config.components), apply_cuda_graph, remove_cuda_graph)


def _release_graphs(pipe, modules: list[torch.nn.Module]) -> None:
    for module in modules:
        remove_cuda_graph(module)


@dataclass(frozen=True)
class RuntimeStep:
    """One part of the runtime: applied when `wanted(config)`; `apply(pipe, config, session)` returns what
    `remove(pipe, state)` needs to undo it exactly, and undoes its own partial work if it fails."""

    name: str
    wanted: Callable[[RuntimeConfig], bool]
    apply: Callable
    remove: Callable


# In the order they are applied; removed in reverse.
RUNTIME_STEPS = (
    # First: the padded LoRA copies it makes are what the cast, compile and graphs then cover.
    RuntimeStep("lora_hotswap", lambda c: c.lora_hotswap, LoRAHotswap, lambda pipe, hotswap: hotswap.remove()),
    RuntimeStep("dtype", lambda c: c.dtype is not None, lambda pipe, c, s: _cast(pipe, DTYPES[c.dtype]), _uncast),
    RuntimeStep("attention", lambda c: c.attention != "default",
                lambda pipe, c, s: apply_attention(denoiser(pipe), c.attention, processors=denoiser_kind(pipe) == "unet"),
                lambda pipe, saved: remove_attention(denoiser(pipe), saved)),
    RuntimeStep("fuse_qkv", lambda c: c.fuse_qkv, lambda pipe, c, s: apply_fused_qkv(denoiser(pipe)),
                lambda pipe, saved: remove_fused_qkv(denoiser(pipe), saved)),
    RuntimeStep("channels_last", lambda c: c.channels_last, _ChannelsLast, lambda pipe, layout: layout.remove()),
    RuntimeStep("quantize", lambda c: c.quantize is not None, _quantize, lambda pipe, layers: layers.remove()),
    RuntimeStep("compile", lambda c: c.compile is not None, _compile, _uncompile),
    # After compile (whose process settings name the inductor cache the artifacts load into), before any call.
    RuntimeStep("compile_cache", lambda c: c.compile_cache is not None,
                lambda pipe, c, s: ArtifactCache(pipe, c, s, _modules(pipe, c.compiled_components)),
                lambda pipe, cache: cache.remove()),
    RuntimeStep("cuda_graph", lambda c: c.cuda_graph, _capture_graphs, _release_graphs),
)


class Runtime:
    """The applied runtime: the steps its config asks for, each with what undoes it; `remove()` undoes all."""

    def __init__(self, pipe, config: RuntimeConfig, session):
        self.pipe = pipe
        self.applied: list[tuple[RuntimeStep, object]] = []
        try:
            for step in RUNTIME_STEPS:
                if step.wanted(config):
                    self.applied.append((step, step.apply(pipe, config, session)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self.applied:
            step, state = self.applied.pop()
            step.remove(self.pipe, state)
