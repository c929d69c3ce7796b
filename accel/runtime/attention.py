"""Attention backend choice for a UNet: PyTorch SDPA (optionally pinned to one kernel) or xformers."""

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
_SAVED = "_accel_saved_attn_processors"

class SDPABackendHook(ModelHook):
    """Run the whole forward under `torch.nn.attention.sdpa_kernel(backend)`."""

    def __init__(self, backend: str):
        super().__init__()
        from torch.nn.attention import SDPBackend

        self.backend = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def new_forward(self, module, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            return self.fn_ref.original_forward(*args, **kwargs)

def _processor_for(attention: str):
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if attention == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            raise ValueError("attention='xformers' needs the xformers package: pip install 'diffusion-accel[xformers]'") from None
        return XFormersAttnProcessor()
    return AttnProcessor2_0()

def apply_attention(unet: torch.nn.Module, attention: str) -> None:
    if attention == "default":
        return
    processor = _processor_for(attention)
    unet.__dict__[_SAVED] = dict(unet.attn_processors)
    unet.set_attn_processor(processor)
    if attention in SDPA_BACKENDS:
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(SDPABackendHook(attention), _HOOK)

def remove_attention(unet: torch.nn.Module) -> None:
    saved = unet.__dict__.pop(_SAVED, None)
    if saved is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    if _HOOK in registry.hooks:
        registry.remove_hook(_HOOK, recurse=False)
    unet.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given

