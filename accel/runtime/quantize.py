"""FP8 and INT8 quantized denoiser layers: 8-bit weights and activations with row-wise scales (W8A8 dynamic).

Each selected `nn.Linear` of the denoiser (and, if asked, each 1x1 `nn.Conv2d`) is swapped for a module holding an
8-bit copy of its weight with one scale per output row. At every call the activations get one scale per row (per
token) from their absolute maximum, and one matmul of the two 8-bit operands gives the output, rescaled by both.
FP8 is E4M3 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning") through `torch._scaled_mm`, which runs on
the FP8 tensor cores of compute capability 8.9+ GPUs (Ada, Hopper). INT8 is symmetric round-to-nearest through
`torch._int_mm`, for GPUs without FP8: per-token activation and per-output-channel weight scales, the vector-wise
scheme of LLM.int8() (Dettmers et al. 2022) and SmoothQuant's W8A8 dynamic baseline (Xiao et al. 2023), without
their outlier handling. The modules are plain tensors and ops (no tensor subclass, no host sync, shapes fixed per
call), so torch.compile traces them and CUDA graphs capture them; docs/techniques.md says why this is not torchao.

Left in 16 bit by default (`DEFAULT_SKIP`, fnmatch patterns on the layer's name in the denoiser;
`RuntimeConfig.quantize_skip` replaces them):
- the linears fed the per-image conditioning vector: timestep, pooled-text, guidance and class embeddings, the UNet
  resnets' `time_emb_proj`, and the DiTs' adaLN modulation (`norm1.linear`, `norm1_context.linear`, the single
  blocks' `norm.linear`, `norm_out.linear`, PixArt's `adaln_single`, Sana's `time_embed`). They run on one row per
  image, so an 8-bit matmul saves nothing there, and their outputs shift, scale or gate a whole block's input and
  residual, so their error reaches every token; ViDiT-Q (Zhao et al. 2024) finds a few such layers far more
  sensitive to quantization than the rest of a DiT;
- the first and last layers, kept in high precision by diffusion quantization work since Q-Diffusion (Li et al.
  2023): a UNet's are convolutions (`conv_in`, `conv_out`: never swapped); a DiT's are the patch and text input
  projections (`x_embedder`, `pos_embed`, `context_embedder`, `caption_projection`) and `proj_out`.
Norms are not linear layers and stay as they are. Layers whose input or output width is not a multiple of 16 (what
`torch._scaled_mm` takes) stay in 16 bit too and are counted in the report, as are those narrower than
`RuntimeConfig.quantize_min_out_features` ("narrow": their input's quantize pass costs more than the 8-bit matmul
saves; `benchmarks/results/quantize/README.md` has the per-layer timings).

A peft LoRA loaded before quantizing keeps its adapters in 16 bit: the layer it wraps (`base_layer`) is quantized
under it, and a LoRA fused before (`fuse_lora`) is quantized with the base weight. Layers with a LoRA variant that
reads the base weight (DoRA) stay in 16 bit. A LoRA loaded onto a quantized layer afterwards is refused by peft
(the module is not an `nn.Linear`; its repr says to restore first); fusing or unfusing a LoRA needs the 16-bit
weight, so do it before `accelerate` or after `restore`.

The swap is exactly reversible: the quantized copies are new tensors (the original layers are never written to),
and removal puts the original module objects back, wherever a copy sits then (a LoRA unloaded meanwhile moves its
base layer up). The original weights stay where they were while quantized (memory is not saved).

Where no GPU can run the format the step refuses before changing anything. Setting the environment variable
`ACCEL_QUANTIZE_CPU=1` lets it run on the CPU, where both matmuls have reference kernels: for tests of the maths,
not for speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UnsupportedDeviceError

CPU_SWITCH = "ACCEL_QUANTIZE_CPU"
# torch._scaled_mm takes inner and outer widths that are multiples of 16 (torch._int_mm: of 8).
ALIGNMENT = 16
# torch._int_mm on CUDA takes more than 16 rows; fewer (one row per image, batch <= 16) are padded with zeros.
INT_MM_MIN_ROWS = 17
# A row of zeros gets this absolute maximum, so its scale is finite and its values stay 0.
_TINY = 1e-12

DEFAULT_SKIP = {
    "unet": ("time_embedding.*", "add_embedding.*", "class_embedding.*", "encoder_hid_proj*", "*.time_emb_proj"),
    "transformer": (
        "time_text_embed.*", "adaln_single.*", "time_embed.*",
        "*.norm1.linear", "*.norm1_context.linear", "*.norm.linear", "norm_out.linear",
        "x_embedder", "pos_embed.*", "context_embedder", "caption_projection.*", "proj_out",
    ),
}


def _fp8_matmul(x, x_scale, weight, weight_scale, bias, out_dtype):
    # Fast accumulation, torchao's inference default: faster on Hopper, its error far below E4M3's rounding.
    return torch._scaled_mm(x, weight.t(), scale_a=x_scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=True)


def _int8_matmul(x, x_scale, weight, weight_scale, bias, out_dtype):
    rows = x.shape[0]
    if rows < INT_MM_MIN_ROWS:  # a shape, not a value: fixed per call, so compile and graphs see one branch
        x = F.pad(x, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    out = torch._int_mm(x, weight.t())[:rows] * x_scale * weight_scale
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


@dataclass(frozen=True)
class QuantFormat:
    """One 8-bit format: how values are stored, the largest magnitude kept, its matmul and the GPUs that run it."""

    name: str
    dtype: torch.dtype
    max_value: float
    matmul: Callable  # (x, x_scale (M, 1), weight (N, K), weight_scale (1, N), bias, out_dtype) -> (M, N)
    capability: tuple[int, int]  # the least CUDA compute capability
    kernel: str
    gpus: str


FORMATS = {
    "fp8": QuantFormat("fp8", torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max, _fp8_matmul, (8, 9),
                       "torch._scaled_mm", "Ada or Hopper: L4, L40S, H100, H200"),
    "int8": QuantFormat("int8", torch.int8, 127.0, _int8_matmul, (7, 5), "torch._int_mm", "Turing or newer"),
}


def quantize_rows(t: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `t` in `fmt` with one float32 scale per row (symmetric, from the row's absolute maximum)."""
    t = t.float()
    scale = t.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / fmt.max_value
    q = t / scale
    if not fmt.dtype.is_floating_point:
        q = q.round()
    return q.clamp(-fmt.max_value, fmt.max_value).to(fmt.dtype), scale


class QuantizedLinear(torch.nn.Module):
    """An 8-bit copy of a linear layer: its weight quantized once per output row, the input per row at every call."""

    def __init__(self, layer: torch.nn.Module, fmt: QuantFormat, out_dtype: torch.dtype):
        super().__init__()
        weight = layer.weight.detach()
        self.fmt, self.out_dtype = fmt, out_dtype
        self.out_features, self.in_features = weight.shape[0], weight[0].numel()
        qweight, scale = quantize_rows(weight.reshape(self.out_features, self.in_features), fmt)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, N): the layout both matmuls take
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().to(out_dtype, copy=True))

    @staticmethod
    def accepts(layer: torch.nn.Module) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features), self.fmt)
        out = self.fmt.matmul(x_q, x_scale, self.qweight, self.weight_scale, self.bias, self.out_dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.fmt.name} row-wise; quantized by accel: accel.restore(pipe) before loading or fusing a LoRA")


class QuantizedPointwiseConv(QuantizedLinear):
    """A 1x1 convolution as the same matmul over the pixels: rows are NHWC pixels, free when the input is channels-last."""

    @staticmethod
    def accepts(layer: torch.nn.Module) -> bool:
        return (layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid")
                and layer.dilation == (1, 1) and layer.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _adapter_layer_type() -> tuple[type, ...]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there are no adapter layers
        return ()
    return (BaseTunerLayer,)


def _output_dtype(fmt: QuantFormat, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype `fmt`'s matmul returns for `dtype` inputs on `device`; raises where the device cannot run it."""
    if device.type == "cpu" and os.environ.get(CPU_SWITCH) == "1":
        return dtype
    what = (f"RuntimeConfig(quantize={fmt.name!r}) runs {fmt.name.upper()} matmuls ({fmt.kernel}), which need a CUDA "
            f"GPU of compute capability {fmt.capability[0]}.{fmt.capability[1]} or newer ({fmt.gpus})")
    instead = "; use quantize='int8' on older CUDA GPUs, or quantize=None" if fmt.name == "fp8" else "; use quantize=None"
    if device.type != "cuda":
        raise UnsupportedDeviceError(f"{what}; the denoiser is on {device.type}{instead} (tests set {CPU_SWITCH}=1 "
                                     "to check the maths on the CPU)")
    capability = torch.cuda.get_device_capability(device)
    if capability < fmt.capability:
        raise UnsupportedDeviceError(f"{what}; {torch.cuda.get_device_name(device)} has compute capability "
                                     f"{capability[0]}.{capability[1]}{instead}")
    x, scale = quantize_rows(torch.ones(32, 32, device=device), fmt)
    error = None
    for out_dtype in dict.fromkeys((dtype, torch.bfloat16)):  # row-wise FP8 in CUTLASS (before cuBLAS 12.9) returns bf16 only
        try:
            fmt.matmul(x, scale, x, scale.reshape(1, -1), torch.ones(32, device=device, dtype=out_dtype), out_dtype)
            return out_dtype
        except RuntimeError as err:
            error = err
    raise UnsupportedDeviceError(f"{what}; {fmt.kernel} failed on {torch.cuda.get_device_name(device)}: {error}")


class QuantizedLayers:
    """The swap on one denoiser: `report` names the layers quantized and those left in 16 bit, by reason;
    `remove()` puts every original layer back."""

    def __init__(self, net: torch.nn.Module, quantize: str, skip: tuple[str, ...], convs: bool = False,
                 min_out_features: int = 0):
        self.net = net
        fmt = FORMATS[quantize]
        swaps = {torch.nn.Linear: QuantizedLinear, **({torch.nn.Conv2d: QuantizedPointwiseConv} if convs else {})}
        self.report: dict[str, list[str]] = {"quantized": [], "skipped": [], "unaligned": [], "narrow": [],
                                             "adapter_variant": []}
        targets = []
        adapters = _adapter_layer_type()

        def visit(owner, key, name, module):
            if isinstance(module, adapters):  # a peft layer: the layer it wraps is quantized, its adapters are not
                if getattr(module, "lora_variant", None):
                    self.report["adapter_variant"].append(name)
                else:
                    visit(module, "base_layer", name, module.base_layer)
                return
            swap = swaps.get(type(module))  # the exact class: subclasses (other quantizers' layers) are left alone
            if swap is None or not swap.accepts(module):
                for child_key, child in module._modules.items():
                    if child is not None:
                        visit(module, child_key, f"{name}.{child_key}" if name else child_key, child)
            elif any(fnmatchcase(name, pattern) for pattern in skip):
                self.report["skipped"].append(name)
            elif module.weight.shape[0] % ALIGNMENT or module.weight[0].numel() % ALIGNMENT:
                self.report["unaligned"].append(name)
            elif module.weight.shape[0] < min_out_features:
                self.report["narrow"].append(name)
            else:
                self.report["quantized"].append(name)
                targets.append((owner, key, module, swap))

        visit(None, "", "", net)
        if not targets:  # asked for and not done: say why rather than run the denoiser in 16 bit as if quantized
            reasons = {"skipped": "left out by the skip patterns", "unaligned": "not multiples of 16 wide",
                       "narrow": f"narrower than quantize_min_out_features={min_out_features}",
                       "adapter_variant": "under a LoRA variant that reads the base weight"}
            found = "; ".join(f"{len(self.report[k])} {text}" for k, text in reasons.items() if self.report[k])
            raise ValueError(f"RuntimeConfig(quantize={quantize!r}) found no layer to quantize in "
                             f"{type(net).__name__} ({found or 'it has no linear layer'}); accepted: a denoiser with "
                             "linear layers the settings leave in (lower quantize_min_out_features, or narrow "
                             "quantize_skip)")
        out_dtypes = {}
        self.originals: dict[torch.nn.Module, torch.nn.Module] = {}
        placed = []
        for owner, key, layer, swap in targets:  # every copy first: a refusal or an error leaves the denoiser as it was
            weight = layer.weight
            if (weight.device, weight.dtype) not in out_dtypes:
                out_dtypes[weight.device, weight.dtype] = _output_dtype(fmt, weight.device, weight.dtype)
            quantized = swap(layer, fmt, out_dtypes[weight.device, weight.dtype])
            self.originals[quantized] = layer
            placed.append((owner, key, quantized))
        for owner, key, quantized in placed:
            owner._modules[key] = quantized

    def remove(self) -> None:
        slots = [(module, key, child) for module in self.net.modules() for key, child in module._modules.items()
                 if child in self.originals]
        for module, key, child in slots:
            module._modules[key] = self.originals[child]
        self.originals.clear()
