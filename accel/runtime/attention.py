"""Attention backend choice: PyTorch SDPA (optionally pinned to one kernel) or xformers (UNets), and fused QKV."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}
ATTENTION_CHOICES = ("default", "sdpa", "xformers", *SDPA_BACKENDS)

_HOOK = "accel.sdpa_backend"


class SDPABackendHook(ModelHook):
    """Run an attention module's forward under `torch.nn.attention.sdpa_kernel(backend)`. Registered on every
    attention module rather than around the whole model, so that compiled code traces the choice into its graph
    (dynamo records `sdpa_kernel` entered inside a compiled region, and the graph and its cache key then name the
    kernel; entered outside, the kernel in use at compile time is baked in and a warm inductor cache hands back a
    graph built for another kernel: benchmarks/results/runtime/sdpa-backends/). Stateless: compile workers re-create
    it on their copies of the blocks."""

    stateless = True

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def fresh(self) -> "SDPABackendHook":
        return SDPABackendHook(self.backend)

    def new_forward(self, module, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[self.backend])):
            return self.fn_ref.original_forward(*args, **kwargs)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def _processor_for(attention: str):
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if attention == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            raise ValueError("attention='xformers' needs the xformers package: pip install 'diffusion-accel[xformers]'") from None
        return XFormersAttnProcessor()
    return AttnProcessor2_0()


def apply_attention(unet: torch.nn.Module, attention: str, processors: bool = True) -> dict:
    """Set every attention processor (`processors=False`: a DiT's own processors, already SDPA, are kept and only
    a pinned kernel applies); returns the processors before, which `remove_attention` puts back."""
    saved = dict(unet.attn_processors)
    if processors:
        unet.set_attn_processor(_processor_for(attention))
    elif attention == "xformers":
        raise ValueError(f"RuntimeConfig(attention='xformers') sets UNet attention processors; {type(unet).__name__} "
                         f"keeps its own (SDPA): use attention='sdpa', 'flash', 'efficient', 'cudnn' or 'math'")
    if attention in SDPA_BACKENDS:
        for module in attention_modules(unet):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(SDPABackendHook(attention), _HOOK)
    return saved


def remove_attention(unet: torch.nn.Module, saved: dict) -> None:
    for module in attention_modules(unet):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and _HOOK in registry.hooks:
            registry.remove_hook(_HOOK, recurse=False)
    unet.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given


def apply_fused_qkv(unet: torch.nn.Module) -> dict:
    """diffusers' `fuse_qkv_projections`: one matmul for q/k/v (k/v in cross-attention); returns what
    `remove_fused_qkv` needs to undo it."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    if not hasattr(unet, "fuse_qkv_projections"):
        raise ValueError(f"RuntimeConfig(fuse_qkv=True) needs diffusers' fuse_qkv_projections, which "
                         f"{type(unet).__name__} does not have")

    attentions = [m for m in unet.modules() if isinstance(m, (Attention, AttentionModuleMixin))]
    saved = {
        "processors": dict(unet.attn_processors),
        "original_attn_processors": unet.__dict__.get("original_attn_processors", _MISSING),
        "attentions": [(m, m.fused_projections) for m in attentions],
    }
    unet.fuse_qkv_projections()
    return saved


_MISSING = object()


def remove_fused_qkv(unet: torch.nn.Module, saved: dict) -> None:
    unet.set_attn_processor(dict(saved["processors"]))
    for module, was_fused in saved["attentions"]:
        if not was_fused:  # drop the fused copies so the state dict is the original one again
            for name in ("to_qkv", "to_kv", "to_added_qkv"):
                if name in module._modules:
                    del module._modules[name]
            module.fused_projections = False
    if saved["original_attn_processors"] is _MISSING:
        unet.__dict__.pop("original_attn_processors", None)
    else:
        unet.original_attn_processors = saved["original_attn_processors"]
