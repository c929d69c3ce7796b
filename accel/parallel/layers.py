"""Patch-parallel layers (DistriFusion, Li et al., CVPR 2024; PCPP, Zhang et al., 2024).

Each wraps one original layer, keeps it as its `module` child and computes the plain operation
whenever the comm manager is not active (world size 1, CFG-only parallelism, calls outside a
split UNet call). While active, the input is this rank's band of rows of the whole feature map:

- `PatchConv2d` (kernel height > 1): sends its band's first and last `p` rows (the halo), then
  runs one conv without row padding over [the neighbour above's last rows; band; the neighbour
  below's first rows], zeros standing in at the image's edges. Fresh halos in synchronous calls,
  the previous step's in asynchronous ones, as in DistriFusion.
- `PatchGroupNorm`: (count, mean, variance) per sample and group from every patch, merged with
  Chan's parallel formula in float32, then one fused `batch_norm` over the (sample, group) rows
  and one `addcmul` for the affine; asynchronous calls merge the other patches' statistics of the
  previous step with the fresh local ones (the staleness correction).
- `PatchSelfAttention` (a diffusers `Attention` that is not cross-attention): its key and value
  projections return the whole image's tokens - the local patch fresh, the others as exchanged -
  so any attention processor attends over the whole image. With `partial_conditioning`
  (PCPP) only that fraction of each adjacent patch's rows, nearest the boundary, is exchanged and
  attended to.

Wrappers are chosen by the class they replace (`LAYER_WRAPPERS`), never by child names.

Per-step overhead, eager mode being launch-bound: nothing syncs with the host, exchanged pieces
are written straight into the comm buffer, and the aten ops of an asynchronous step of the tiny
SDXL test UNet (2 gloo processes, rank 0, compute ops + view ops; the plain UNet on a half-height
input: 570 + 592) went from 1512 + 2166 to 1090 + 847: conv 165 -> 84 (28 plain: was conv + edge
recomputes with their cats and copies, now halo cat + padded cat + conv), GroupNorm 776 -> 435 (31
plain: ~25 small float32 kernels each, now 14), self-attention 162 -> 162 (108 plain: the send copy
and the whole-image cat per key/value are already one kernel each), views 2166 -> 847.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..errors import UnsupportedPipelineError


class PatchLayer(torch.nn.Module):
    """Base of the wrappers: the original layer as `module`, the shared plan and an exchange key."""

    def __init__(self, module: torch.nn.Module, name: str, plan):
        super().__init__()
        self.module = module
        self.key = name
        self.__dict__["_plan"] = plan  # not a submodule: the plan is shared by every wrapper

    def __getattr__(self, name: str):
        # Code that inspects the layer it calls (peft reads `lora_A.weight.dtype`) sees the original's attributes.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def comm(self):
        return self._plan.comm

    def active(self) -> bool:
        comm = self._plan.comm
        return comm is not None and comm.active

    def unwrap(self) -> torch.nn.Module:
        return self.module


class PatchConv2d(PatchLayer):
    @staticmethod
    def applies(conv: torch.nn.Conv2d) -> bool:
        return conv.kernel_size[0] > 1

    @staticmethod
    def check(conv: torch.nn.Conv2d, name: str) -> None:
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.dilation[0] != 1:
            raise UnsupportedPipelineError(
                f"patch parallelism: conv {name} has padding={conv.padding!r}, padding_mode={conv.padding_mode!r}, "
                f"dilation={conv.dilation}; supported: integer zero padding, dilation 1 along the height")
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        # Bands of rows map to bands of rows, and a halo of `p` rows covers both sides, iff -s <= 2p - k < 0.
        if not (p >= 1 and -s <= 2 * p - k < 0):
            raise UnsupportedPipelineError(
                f"patch parallelism: conv {name} (kernel {k}, stride {s}, padding {p} along the height) does not map "
                "a band of rows to a band of rows; supported: padding p >= 1 with -stride <= 2p - kernel < 0 "
                "(e.g. kernel 3, padding 1, stride 1 or 2)")

    def __init__(self, module, name, plan):
        super().__init__(module, name, plan)
        self._zero_halos: dict[tuple, torch.Tensor] = {}  # the image's zero padding, for the edge bands

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.module
        if not self.active():
            return conv(x)
        p = conv.padding[0]
        comm = self.comm
        index, last = comm.index, comm.size - 1
        rows = x.shape[2]
        if rows < p:
            raise ValueError(f"patch parallelism: a band of {rows} rows is thinner than the halo of {self.key} ({p} rows)")
        # Send [first p rows; last p rows]; one conv, without row padding, over [above halo; band; below halo].
        parts = comm.exchange(self.key, [x[:, :, :p], x[:, :, rows - p:]], cat_dim=2)
        above = parts[index - 1][:, :, p:] if index > 0 else self._zero_halo(x, p)
        below = parts[index + 1][:, :, :p] if index < last else self._zero_halo(x, p)
        padded = torch.cat([above, x, below], dim=2)
        return F.conv2d(padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)

    def _zero_halo(self, x: torch.Tensor, p: int) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1], p, x.shape[3])
        key = (shape, x.dtype, x.device)
        zeros = self._zero_halos.get(key)
        if zeros is None:
            zeros = self._zero_halos[key] = x.new_zeros(shape)
        return zeros

    def unwrap(self) -> torch.nn.Module:
        self._zero_halos.clear()
        return self.module


class PatchGroupNorm(PatchLayer):
    @staticmethod
    def applies(norm: torch.nn.GroupNorm) -> bool:
        return True

    @staticmethod
    def check(norm, name: str) -> None:
        pass

    def __init__(self, module, name, plan):
        super().__init__(module, name, plan)
        self._counts: dict[tuple, torch.Tensor] = {}  # elements per (sample, group) of a band of this shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.module
        if not self.active():
            return norm(x)
        batch, groups = x.shape[0], norm.num_groups
        grouped = x.reshape(1, batch * groups, -1)
        var, mean = torch.var_mean(grouped.float(), dim=-1, correction=0)  # (1, batch * groups)
        parts = self.comm.exchange(self.key, [self._count(mean, grouped.shape[-1]), mean, var], cat_dim=0)
        counts, means, variances = torch.stack(parts, dim=1)  # (3, patches, batch * groups), float32
        # Chan's merge of the patches' (count, mean, variance); every term is >= 0, so is the variance.
        weights = counts / counts.sum(0)
        mean = (weights * means).sum(0)
        deviation = means - mean
        var = (weights * torch.addcmul(variances, deviation, deviation)).sum(0)
        # One fused normalisation per (sample, group) with the merged statistics, in float32 inside.
        out = F.batch_norm(grouped, mean, var, None, None, False, 0.0, norm.eps).view_as(x)
        if norm.affine:
            affine = (-1,) + (1,) * (x.dim() - 2)
            out = torch.addcmul(norm.bias.view(affine), out, norm.weight.view(affine))
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _count(self, mean: torch.Tensor, count: int) -> torch.Tensor:
        key = (tuple(mean.shape), count, mean.device)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = torch.full_like(mean, count)
        return counts

    def unwrap(self) -> torch.nn.Module:
        self._counts.clear()
        return self.module


class PatchSelfAttention(PatchLayer):
    """Self-attention over the whole image: the key/value projections' outputs are exchanged."""

    @staticmethod
    def applies(attn: Attention) -> bool:
        return not attn.is_cross_attention

    @staticmethod
    def check(attn, name: str) -> None:
        pass

    def __init__(self, module, name, plan):
        super().__init__(module, name, plan)
        self._gathering = False
        self._handles = [module.to_k.register_forward_hook(self._hook("k")),
                         module.to_v.register_forward_hook(self._hook("v"))]

    def unwrap(self) -> torch.nn.Module:
        for handle in self._handles:
            handle.remove()
        return self.module

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        attn = self.module
        if encoder_hidden_states is not None or not self.active():
            return attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"patch parallelism cannot split self-attention {self.key} with an attention mask")
        if getattr(attn, "fused_projections", False):
            raise UnsupportedPipelineError("patch parallelism needs separate key/value projections; "
                                           "apply it without RuntimeConfig(fuse_qkv=True)")
        self._gathering = True
        try:
            return attn(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs)
        finally:
            self._gathering = False

    def _hook(self, which: str):
        def hook(module, inputs, output):
            if not self._gathering:
                return None
            return self._whole_image(f"{self.key}.{which}", output)

        return hook

    def _whole_image(self, key: str, local: torch.Tensor) -> torch.Tensor:
        comm, plan = self.comm, self._plan
        fraction = plan.config.partial_conditioning
        if fraction is None:
            return torch.cat(comm.exchange(key, local), dim=1)
        width = plan.token_width(local.shape[1])
        rows = local.shape[1] // width
        share = max(1, math.floor(fraction * rows)) * width  # rounded down: a thin band shares less, not more
        index, last = comm.index, comm.size - 1
        # Each band sends its first rows to the patch above and its last rows to the one below.
        sent = [local[:, :share]] if index > 0 else []
        sent += [local[:, -share:]] if index < last else []
        parts = comm.exchange(key, sent, cat_dim=1)
        seen = [local]
        if index > 0:
            previous = parts[index - 1]  # [first; last] rows, or only [last] from the top patch
            seen.insert(0, previous if index - 1 == 0 else previous[:, previous.shape[1] // 2:])
        if index < last:
            following = parts[index + 1]  # [first; last] rows, or only [first] from the bottom patch
            seen.append(following if index + 1 == last else following[:, :following.shape[1] // 2])
        return torch.cat(seen, dim=1)


# The layer class a wrapper replaces -> the wrapper; subclasses match through their MRO.
LAYER_WRAPPERS: dict[type, type[PatchLayer]] = {
    torch.nn.Conv2d: PatchConv2d,
    torch.nn.GroupNorm: PatchGroupNorm,
    Attention: PatchSelfAttention,
}


def wrapper_for(module: torch.nn.Module) -> type[PatchLayer] | None:
    for cls in type(module).__mro__:
        wrapper = LAYER_WRAPPERS.get(cls)
        if wrapper is not None:
            return wrapper if wrapper.applies(module) else None
    return None


def wrap_layers(unet: torch.nn.Module, plan) -> list[tuple[torch.nn.Module, str, PatchLayer]]:
    """Replace every layer that needs it by its wrapper; returns (parent, child name, wrapper) records.

    Checks every layer before changing any, so an unsupported UNet is left as it was.
    """
    found = []
    for parent_name, parent in unet.named_modules():
        for child_name, child in parent.named_children():
            wrapper = wrapper_for(child)
            if wrapper is not None:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                wrapper.check(child, name)
                found.append((parent, child_name, child, name, wrapper))
    records = []
    try:
        for parent, child_name, child, name, wrapper in found:
            layer = wrapper(child, name, plan)
            setattr(parent, child_name, layer)
            records.append((parent, child_name, layer))
    except BaseException:
        unwrap_layers(records)
        raise
    return records


def unwrap_layers(records) -> None:
    for parent, child_name, layer in reversed(records):
        setattr(parent, child_name, layer.unwrap())
