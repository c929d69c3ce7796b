"""LCM-LoRA as an acceleration (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration
Module"): load a latent-consistency LoRA into the pipeline's UNet and sample with LCM's multistep
sampler in a few steps, without classifier-free guidance.

The LoRA is one that `distill.lcm` (or the LCM-LoRA authors) trained on the same base model; it
loads through diffusers' `load_lora_weights` under its own adapter name, so it also plugs into a
fine-tuned model of that base and next to other LoRAs. By default it is then fused into the base
weights (`fuse_lora`): unfused peft layers cost extra kernel launches in every adapted layer, which
dominates a small, launch-bound UNet. Removing it (`restore`) copies back the original tensors of the
fused layers (unfusing subtracts in floating point, which is not exact), unloads the LoRA and puts
the original scheduler back: the weights and modules are those of before, bit for bit. LoRAs the
user had loaded stay loaded, each layer with the active adapters and scales it had before.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LCMLoRAConfig:
    """An LCM-LoRA to load and the few-step sampling it is made for.

    Args:
        path: a `.safetensors` LoRA file, or a folder holding `pytorch_lora_weights.safetensors`
            (what `distill.lcm` and `save_lora_weights` write) or exactly one `.safetensors` file.
        adapter_name: the name the LoRA is loaded under.
        num_steps: default `num_inference_steps` of every call (LCM: 2-8).
        guidance_scale: default `guidance_scale` of every call; 1 (no CFG) as LCM-LoRA is
            distilled with the guidance folded in.
        lora_scale: the adapter's weight.
        original_inference_steps, timestep_scaling: the distillation schedule and boundary
            condition the LoRA was trained with (`distill.lcm` and LCM-LoRA use 50 and 10).
        fuse: fold the LoRA into the base weights (one kernel per adapted layer instead of five). Left
            unfused, with a warning, while the pipeline has other active or fused LoRAs: peft runs
            no unfused adapter in a layer that holds a fused one.
    """

    path: str
    adapter_name: str = "lcm"
    num_steps: int = 4
    guidance_scale: float = 1.0
    lora_scale: float = 1.0
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    fuse: bool = True

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)):
            raise ValueError(f"LCMLoRAConfig.path must be a path to a .safetensors LoRA, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        self.weight_file()  # raises for a missing path or a non-safetensors file
        for name in ("num_steps", "original_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LCMLoRAConfig.{name} must be a positive int, got {value!r}")
        if self.num_steps > self.original_inference_steps:
            raise ValueError(f"LCMLoRAConfig.num_steps={self.num_steps} exceeds original_inference_steps="
                             f"{self.original_inference_steps}: LCM takes its steps from the distillation schedule")
        if not self.adapter_name or not isinstance(self.adapter_name, str):
            raise ValueError(f"LCMLoRAConfig.adapter_name must be a non-empty string, got {self.adapter_name!r}")
        if self.guidance_scale < 0 or self.lora_scale < 0 or self.timestep_scaling <= 0:
            raise ValueError("LCMLoRAConfig.guidance_scale and lora_scale must be >= 0 and timestep_scaling > 0")
        if not isinstance(self.fuse, bool):
            raise ValueError(f"LCMLoRAConfig.fuse must be True or False, got {self.fuse!r}")

    def weight_file(self) -> Path:
        """The LoRA's safetensors file."""
        path = Path(self.path)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"LCMLoRAConfig.path={self.path!r} is not a .safetensors file; only safetensors LoRAs load")
            return path
        if path.is_dir():
            if (path / LORA_WEIGHT_NAME).is_file():
                return path / LORA_WEIGHT_NAME
            found = sorted(path.glob("*.safetensors"))
            if len(found) == 1:
                return found[0]
            raise ValueError(f"LCMLoRAConfig.path={self.path!r} is a folder with {len(found)} .safetensors files; "
                             f"expected {LORA_WEIGHT_NAME} or exactly one, or pass the file itself")
        raise FileNotFoundError(f"LCMLoRAConfig.path={self.path!r} does not exist; pass a .safetensors LoRA file or "
                                f"the folder holding {LORA_WEIGHT_NAME}")


class LCMLoRA:
    """The applied LCM-LoRA: adapter loaded (and fused), LCM scheduler set; `remove()` undoes both exactly."""

    def __init__(self, pipe, config: LCMLoRAConfig, session):
        import samplers

        if not hasattr(pipe, "load_lora_weights"):
            raise TypeError(f"{type(pipe).__name__} cannot load LoRA weights (no load_lora_weights); "
                            "supported: Stable Diffusion pipelines with diffusers' LoRA loader")
        weight_file = config.weight_file()
        loaded = {name for names in pipe.get_list_adapters().values() for name in names} if _has_adapters(pipe) else set()
        if config.adapter_name in loaded:
            raise ValueError(f"the pipeline already has an adapter named {config.adapter_name!r}; "
                             f"choose another LCMLoRAConfig.adapter_name (loaded: {sorted(loaded)})")
        active = list(pipe.get_active_adapters()) if loaded else []
        scheduler = samplers.make_scheduler(
            "lcm",
            num_steps=config.num_steps,
            base=pipe.scheduler,
            original_inference_steps=config.original_inference_steps,
            timestep_scaling=config.timestep_scaling,
        )
        self.user_layers = _adapter_state(pipe) if loaded else []
        pipe.load_lora_weights(str(weight_file.parent), weight_name=weight_file.name, adapter_name=config.adapter_name)
        if active or config.lora_scale != 1.0:
            pipe.set_adapters(active + [config.adapter_name], adapter_weights=[1.0] * len(active) + [config.lora_scale])
            for layer, _, scaling in self.user_layers:  # set_adapters reset the user's adapters to weight 1: keep theirs
                layer.scaling.update(scaling)
        self.originals = None
        if config.fuse:
            if active or getattr(pipe, "_merged_adapters", None):
                warnings.warn(f"the pipeline has other active or fused LoRAs ({sorted(loaded)}); the LCM-LoRA is left "
                              "unfused so that they keep working (slower: extra kernels in every adapted layer)")
            else:
                self.originals = _fuse(pipe, config.adapter_name)
        self.pipe, self.session, self.scheduler, self.adapter_name = pipe, session, pipe.scheduler, config.adapter_name
        pipe.scheduler = scheduler
        session.call_defaults["num_inference_steps"] = config.num_steps
        session.call_defaults["guidance_scale"] = config.guidance_scale

    def remove(self) -> None:
        pipe = self.pipe
        pipe.scheduler = self.scheduler
        if self.originals is not None:
            _unfuse(pipe, self.originals)
        if self.user_layers:
            _restore_user_adapters(pipe, self.adapter_name, self.user_layers)
        else:
            # no other adapter: take the LoRA layers out entirely, leaving the original modules
            pipe.unload_lora_weights()
        self.session.call_defaults.pop("num_inference_steps", None)
        self.session.call_defaults.pop("guidance_scale", None)


def _adapted_layers(pipe, adapter_name: str):
    """(component name, peft layer) of every layer that holds adapter `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, model in _lora_components(pipe):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and (
                    adapter_name in getattr(module, "lora_A", {}) or adapter_name in getattr(module, "lora_embedding_A", {})):
                yield name, module


@torch.no_grad()
def _fuse(pipe, adapter_name: str) -> dict:
    """Fuse the adapter; returns the original tensors of the layers that fusing changes, where they lie."""
    originals, components = {}, set()
    for component, layer in _adapted_layers(pipe, adapter_name):
        base = layer.get_base_layer()
        changed = [base.weight]
        if getattr(layer, "lora_bias", {}).get(adapter_name, False) and base.bias is not None:
            changed.append(base.bias)
        for tensor in changed:
            originals[id(tensor)] = (tensor, tensor.detach().clone())
        components.add(component)
    # the adapter weight is in the layers' scaling already (set_adapters): fuse at scale 1
    pipe.fuse_lora(components=sorted(components), lora_scale=1.0, adapter_names=[adapter_name])
    return {"components": sorted(components), "tensors": list(originals.values())}


@torch.no_grad()
def _unfuse(pipe, originals: dict) -> None:
    # unfuse for peft's and diffusers' bookkeeping, then put the exact original values back
    pipe.unfuse_lora(components=originals["components"])
    for tensor, original in originals["tensors"]:
        tensor.copy_(original)


def _lora_components(pipe):
    """(name, model) of every component the pipeline's LoRA loader adapts."""
    for name in pipe._lora_loadable_modules:
        model = getattr(pipe, name, None)
        if model is not None:
            yield name, model


def _adapter_state(pipe) -> list:
    """Per peft layer the user's adapters put there: the layer, its active adapters and its scales."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(module, list(module.active_adapters), dict(getattr(module, "scaling", {})))
            for _, model in _lora_components(pipe) for module in model.modules() if isinstance(module, BaseTunerLayer)]


def _restore_user_adapters(pipe, adapter_name: str, user_layers: list) -> None:
    """Delete the LCM adapter and give every layer back its former active adapters and scales; layers
    that only the LCM-LoRA wrapped get their original module back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe.delete_adapters(adapter_name)
    kept = {id(layer) for layer, _, _ in user_layers}
    for _, model in _lora_components(pipe):
        wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and id(m) not in kept]
        for path, layer in wrapped:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, layer.get_base_layer())
    # peft activates a remaining adapter when the active one is deleted: put the user's choice back
    for layer, active, scaling in user_layers:
        layer.set_adapter(active)
        if scaling:
            layer.scaling.update(scaling)


def _has_adapters(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return bool(getattr(unet, "peft_config", None))
