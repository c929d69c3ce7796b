"""The conditioning a Stable Diffusion family UNet takes for a caption, shared by knowledge distillation
(``distill.kd``), latent consistency distillation (``distill.lcm``) and LAPTOP-Diff calibration
(``pruning.laptop``): it lives in the core so that neither of those packages imports the other.

SD 1.x / 2.x UNets take the text encoder's hidden states. SDXL UNets (``addition_embed_type="text_time"``,
Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis") take the
penultimate hidden states of both text encoders concatenated, plus ``added_cond_kwargs``: the pooled projection
of ``text_encoder_2`` (``text_embeds``) and the micro-conditioning ``time_ids`` (original size, crop top-left,
target size). Everything here comes from the pipeline's own ``encode_prompt`` and ``_get_add_time_ids``, so a
student trains on exactly what it is given at inference, including the unconditional embedding of classifier-free
guidance (for SDXL with ``force_zeros_for_empty_prompt``, zeros rather than the encoded empty prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_TIME = "text_time"
# addition_embed_type values whose conditioning this module builds: none (SD 1.x/2.x) and SDXL's.
SUPPORTED_ADDITION_EMBED_TYPES = (None, TEXT_TIME)


@dataclass
class Conditioning:
    """Per-row UNet conditioning: ``encoder_hidden_states`` ``(N, L, D)`` and, for SDXL, ``text_embeds``
    ``(N, P)`` and ``time_ids`` ``(N, 6)``. Indexing selects rows of all three."""

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __post_init__(self):
        if (self.text_embeds is None) != (self.time_ids is None):
            raise ValueError("Conditioning needs both text_embeds and time_ids (SDXL) or neither (SD 1.x/2.x)")
        rows = self.encoder_hidden_states.shape[0]
        for name in ("text_embeds", "time_ids"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != rows:
                raise ValueError(f"Conditioning.{name} has {value.shape[0]} rows, encoder_hidden_states {rows}")

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        def pick(value):
            return None if value is None else value[index.to(value.device) if torch.is_tensor(index) else index]

        return Conditioning(pick(self.encoder_hidden_states), pick(self.text_embeds), pick(self.time_ids))

    @property
    def added_cond_kwargs(self) -> dict | None:
        """SDXL's ``added_cond_kwargs`` of a UNet call, or ``None`` for a text-only conditioning."""
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def unet_kwargs(self) -> dict:
        """Keyword arguments of a ``UNet2DConditionModel`` call: the text states, and SDXL's added conditions."""
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        def move(value):
            return None if value is None else value.to(device=device, dtype=dtype)

        return Conditioning(move(self.encoder_hidden_states), move(self.text_embeds), move(self.time_ids))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Rows of ``parts`` one after the other (the CFG batch: unconditional, then conditional)."""
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(join("encoder_hidden_states"), join("text_embeds"), join("time_ids"))


def as_conditioning(value) -> Conditioning:
    """A ``Conditioning`` as is; a tensor of text states (SD 1.x/2.x) wrapped as one."""
    if isinstance(value, Conditioning):
        return value
    if torch.is_tensor(value):
        return Conditioning(value)
    raise TypeError(f"expected an accel.conditioning.Conditioning or a tensor of text states, got {type(value).__name__}")


def takes_added_conditions(unet) -> bool:
    """Whether ``unet`` is SDXL-conditioned (pooled text embeds and time ids besides the text states)."""
    return getattr(unet.config, "addition_embed_type", None) == TEXT_TIME


def check_unet_conditioning(unet, conditioning: Conditioning | None = None, *, role: str = "UNet") -> None:
    """Raise if this module cannot condition ``unet``, or if ``conditioning`` lacks what ``unet`` needs."""
    kind = getattr(unet.config, "addition_embed_type", None)
    if kind not in SUPPORTED_ADDITION_EMBED_TYPES:
        raise ValueError(f"the {role} has addition_embed_type={kind!r}; supported: None (SD 1.x/2.x) and "
                         f"{TEXT_TIME!r} (SDXL)")
    if conditioning is not None and kind == TEXT_TIME and conditioning.text_embeds is None:
        raise ValueError(f"the {role} is SDXL-conditioned (addition_embed_type='text_time') and needs pooled text "
                         "embeds and time ids; encode the captions with accel.conditioning.encode_conditioning(pipe, "
                         "captions) rather than passing text states alone")


def _resolution(pipe, resolution) -> tuple[int, int]:
    if resolution is None:
        size = pipe.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return tuple(int(s) * pipe.vae_scale_factor for s in size)
    if isinstance(resolution, int):
        return (resolution, resolution)
    height, width = resolution
    return (int(height), int(width))


@torch.no_grad()
def encode_conditioning(pipe, captions, *, resolution: int | tuple[int, int] | None = None, unconditional: bool = True,
                        batch_size: int = 64) -> Conditioning:
    """The conditioning of every caption and, when ``unconditional``, the pipeline's unconditional one last.

    ``pipe``: a Stable Diffusion (1.x/2.x) or SDXL pipeline. SDXL's time ids are ``(resolution, (0, 0),
    resolution)``, what ``StableDiffusionXLPipeline`` passes at that output size (``resolution`` in pixels,
    ``(height, width)`` or one int; default: the UNet's sample size times the VAE factor). Returns float32 rows
    on the text encoders' device.
    """
    unet = pipe.unet
    check_unet_conditioning(unet, role="teacher UNet")
    sdxl = takes_added_conditions(unet)
    if sdxl and (getattr(pipe, "text_encoder_2", None) is None or not hasattr(pipe, "_get_add_time_ids")):
        raise ValueError(f"{type(pipe).__name__} has an SDXL UNet but no text_encoder_2 / _get_add_time_ids; "
                         "supported: StableDiffusionXLPipeline and pipelines built like it")
    texts = list(captions)
    device = pipe._execution_device

    def encode(prompts, guided):
        out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=guided)
        if sdxl:
            return (out[1], out[3]) if guided else (out[0], out[2])
        return (out[1] if guided else out[0]), None

    states, pooled = [], []
    for start in range(0, len(texts), batch_size):
        hidden, pool = encode(texts[start : start + batch_size], False)
        states.append(hidden.float())
        pooled.append(None if pool is None else pool.float())
    if unconditional:
        # The negative branch of a guided call without a negative prompt: what the pipeline uses at inference.
        hidden, pool = encode([""], True)
        states.append(hidden.float())
        pooled.append(None if pool is None else pool.float())
    if not states:
        raise ValueError("encode_conditioning needs at least one caption or unconditional=True")
    hidden = torch.cat(states)
    if not sdxl:
        return Conditioning(hidden)
    size = _resolution(pipe, resolution)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return Conditioning(hidden, torch.cat(pooled), time_ids.to(hidden.device).repeat(hidden.shape[0], 1))
