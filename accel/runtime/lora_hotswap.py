"""LoRA hotswap under the compiled runtime: swap the denoiser's LoRA, or change its weight, with no recompilation
and no new CUDA graphs (peft's hotswap, https://huggingface.co/docs/peft/main/en/package_reference/hotswap, which
diffusers exposes as `enable_lora_hotswap` / `load_lora_weights(..., hotswap=True)`).

Compiled code and CUDA graphs keep what they were made with: graphs replay the addresses of the LoRA weights (and
the scalars they captured), and a change of an adapter scale held as a Python float recompiles. So before anything compiles, each LoRA layer of the denoiser
gets private copies of its lora_A / lora_B, padded with zeros to `lora_max_rank`, and 0-d tensor scales; the
user's own modules and scales are kept aside for `restore`. A swap copies the new LoRA into those tensors in place
(peft zero-fills the unused rank) and fills the scales; a weight change only fills the scales.
"""

from __future__ import annotations

import copy
import math

import torch

from ..pipelines import denoiser, denoiser_kind


def _lora_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def _is_compiled(module: torch.nn.Module) -> bool:
    return hasattr(module, "_orig_mod") or any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"a LoRA scale is a number, got {scale!r}")


class LoRAHotswap:
    """The denoiser's LoRA layers prepared for in-place swaps; `remove()` puts the user's modules and scales back."""

    def __init__(self, pipe, config, session):
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self.pipe, self.net = pipe, denoiser(pipe)
        layers = _lora_layers(self.net)
        if not layers:
            raise ValueError("RuntimeConfig(lora_hotswap=True) swaps into a LoRA loaded before accelerate; the "
                             f"{denoiser_kind(pipe)} has none: call pipe.load_lora_weights(path, adapter_name=...) first")
        if _is_compiled(self.net):
            raise ValueError(f"RuntimeConfig(lora_hotswap=True) must prepare the LoRA before anything is compiled, and "
                             f"the {denoiser_kind(pipe)} is compiled already; accelerate the uncompiled pipeline and let "
                             "RuntimeConfig(compile=...) compile it")
        merged = {name for _, layer in layers for name in layer.merged_adapters}
        self.adapters = sorted({name for _, layer in layers for name in layer.lora_A} - merged)
        if not self.adapters:
            raise ValueError(f"the denoiser's LoRAs ({', '.join(sorted(merged))}) are fused into its weights, and a fused "
                             "LoRA cannot be swapped; load it unfused (LCMLoRAConfig(fuse=False) for an LCM-LoRA)")
        self._check_text_encoders()
        rank = max(layer.lora_A[name].weight.shape[0] for _, layer in layers for name in self.adapters if name in layer.lora_A)
        self.max_rank = config.lora_max_rank or rank
        if rank > self.max_rank:
            raise ValueError(f"the loaded LoRA has rank {rank}, above RuntimeConfig.lora_max_rank={self.max_rank}; "
                             f"set lora_max_rank to the highest rank of the LoRAs to swap in")
        # What restore puts back: the user's lora_A / lora_B modules and scales, untouched by any swap.
        self.originals = [(layer, dict(layer.lora_A), dict(layer.lora_B), dict(layer.scaling)) for _, layer in layers]
        self.layers: dict[str, dict[str, torch.nn.Module]] = {name: {} for name in self.adapters}
        self.base: dict[tuple[int, str], torch.Tensor] = {}  # each layer's scale at weight 1 (alpha / r), on its device
        try:
            for path, layer in layers:
                device = layer.get_base_layer().weight.device
                for name in self.adapters:
                    if name not in layer.lora_A:
                        continue
                    layer.lora_A[name] = copy.deepcopy(layer.lora_A[name])
                    layer.lora_B[name] = copy.deepcopy(layer.lora_B[name])
                    base = layer.lora_alpha[name] / (math.sqrt(layer.r[name]) if layer.use_rslora.get(name) else layer.r[name])
                    self.base[id(layer), name] = torch.tensor(base, device=device)
                    layer.scaling[name] = torch.tensor(float(layer.scaling[name]), device=device)
                    self.layers[name][path] = layer
            prepare_model_for_compiled_hotswap(self.net, target_rank=self.max_rank, check_compiled="ignore")
        except BaseException:
            self.remove()
            raise

    def _check_text_encoders(self) -> None:
        """diffusers swaps the denoiser's part of a LoRA only: one that also adapts a text encoder cannot be swapped."""
        kind = denoiser_kind(self.pipe)
        for name in getattr(self.pipe, "_lora_loadable_modules", ()):
            model = getattr(self.pipe, name, None)
            if name == kind or not isinstance(model, torch.nn.Module):
                continue
            found = sorted({a for _, layer in _lora_layers(model) for a in layer.lora_A} & set(self.adapters))
            if found:
                raise ValueError(f"LoRA {', '.join(found)} also adapts {name}; hotswap swaps the {kind}'s LoRA only "
                                 f"(diffusers cannot hotswap text encoders): load a LoRA of the {kind} alone")

    def adapter(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            if len(self.adapters) > 1:
                raise ValueError(f"the pipeline has several swappable LoRAs ({', '.join(self.adapters)}); name one with "
                                 "adapter_name=")
            return self.adapters[0]
        if adapter_name not in self.adapters:
            raise ValueError(f"no swappable LoRA named {adapter_name!r}; swappable: {', '.join(self.adapters)} (a LoRA "
                             "loaded after accelerate, or fused, is not)")
        return adapter_name

    def swap(self, lora, adapter_name: str | None, scale: float, **kwargs) -> None:
        _check_scale(scale)
        name = self.adapter(adapter_name)
        self._check_swap(lora, name, kwargs)
        self.pipe.load_lora_weights(lora, adapter_name=name, hotswap=True, **kwargs)
        layers = self.layers[name].values()
        for layer in layers:  # peft filled each swapped layer's scale with the new alpha / r: that is weight 1
            self.base[id(layer), name].copy_(layer.scaling[name])
        self.set_scale(scale, name)

    def _check_swap(self, lora, name: str, kwargs: dict) -> None:
        """Refuse, before anything changes, what cannot be copied into the prepared tensors (a failed diffusers hotswap
        deletes the adapter it was swapping into)."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        loaded = self.pipe.lora_state_dict(lora, **kwargs)
        state_dict = loaded[0] if isinstance(loaded, tuple) else loaded
        kind = denoiser_kind(self.pipe)
        others = sorted({key.split(".")[0] for key in state_dict if not key.startswith(f"{kind}.")})
        if others:
            raise ValueError(f"the LoRA also adapts {', '.join(others)}; hotswap swaps the {kind}'s LoRA only (diffusers "
                             "cannot hotswap text encoders)")
        state_dict = {key.removeprefix(f"{kind}."): value for key, value in state_dict.items()}
        if not state_dict:
            raise ValueError(f"the LoRA has no weights for the {kind}")
        if "lora_A" not in next(iter(state_dict)):
            state_dict = convert_unet_state_dict_to_peft(state_dict)
        targets = {key.split(".lora_")[0] for key in state_dict}
        new = sorted(targets - set(self.layers[name]))
        if new:
            raise ValueError(f"the LoRA adapts {len(new)} layer(s) that LoRA {name!r} did not ({', '.join(new[:3])}"
                             f"{', ...' if len(new) > 3 else ''}); hotswap copies into the layers adapted at accelerate "
                             "only: load first the LoRA that adapts the most layers")
        ranks = [v.shape[0] if ".lora_A." in k else v.shape[1] for k, v in state_dict.items() if v.ndim > 1]
        if ranks and max(ranks) > self.max_rank:
            raise ValueError(f"the LoRA has rank {max(ranks)}, above RuntimeConfig.lora_max_rank={self.max_rank}; "
                             "accelerate with lora_max_rank at least the highest rank to swap in")

    def set_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """The adapter's weight, as diffusers' `set_adapters(name, weight)`: scale = weight * alpha / r, in place."""
        _check_scale(scale)
        name = self.adapter(adapter_name)
        for layer in self.layers[name].values():
            torch.mul(self.base[id(layer), name], scale, out=layer.scaling[name])

    def remove(self) -> None:
        for layer, lora_a, lora_b, scaling in self.originals:
            for name, module in lora_a.items():
                layer.lora_A[name] = module
            for name, module in lora_b.items():
                layer.lora_B[name] = module
            layer.scaling.update(scaling)
        self.originals = []
