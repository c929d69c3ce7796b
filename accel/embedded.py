"""The embedded default model: a mini Stable Diffusion trained on CIFAR-10.

Same architecture as Stable Diffusion v1 (Rombach et al., 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): a KL autoencoder, a UNet2DConditionModel with cross-attention down blocks, a
cross-attention mid block and cross-attention up blocks, a CLIP text encoder and a CLIP BPE tokenizer,
scaled down for 32x32 images. The autoencoder downsamples by 2, so a 32x32x3 image becomes a 16x16x4
latent: at factor 8 a CIFAR image would be a 4x4 latent, too small for a three-level UNet, and factor 2
keeps reconstructions near-lossless at a compression of 3x.

The folder ``accel/models/mini-sd-cifar10`` loads with plain diffusers, offline:
``StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from .quality.cifar import CIFAR10_CLASSES  # noqa: F401  (re-exported: the class names are the prompts)

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "mini-sd-cifar10"

CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "an image of a {}",
    "a picture of a {}",
    "a small photo of a {}",
    "a blurry photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
)

# The prompt the quality harness uses for class ``c``.
EVAL_TEMPLATE = "a photo of a {}"
# The programs' defaults on this model (CLI, batch script, app): its quality was measured at DPM-Solver++ 20 steps,
# guidance 4 (the model card).
EMBEDDED_STEPS = 20
EMBEDDED_GUIDANCE = 4.0

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
VAE_SCALE_FACTOR = 2
TEXT_HIDDEN_SIZE = 256
MODEL_MAX_LENGTH = 77
# 256 byte symbols, their 256 "</w>" variants, 4096 kept CLIP merges, <|startoftext|>, <|endoftext|>.
TOKENIZER_NUM_MERGES = 4096
VOCAB_SIZE = 512 + TOKENIZER_NUM_MERGES + 2


def caption(template: str, class_name: str) -> str:
    """Fill a template, with "an" before a vowel ("a photo of a {}" -> "a photo of an airplane")."""
    if template.endswith("a {}") and class_name[0] in "aeiou":
        template = template[: -len("a {}")] + "an {}"
    return template.format(class_name)


def class_captions(class_name: str) -> list[str]:
    return [caption(template, class_name) for template in CAPTION_TEMPLATES]


def eval_prompt(class_name: str) -> str:
    return caption(EVAL_TEMPLATE, class_name)


def unet_config(block_out_channels: tuple[int, ...] = (64, 128, 192), layers_per_block: int = 2) -> dict:
    """SD v1 layout at three levels (16x16, 8x8, 4x4): attention everywhere but the lowest level."""
    depth = len(block_out_channels)
    return dict(
        sample_size=IMAGE_SIZE // VAE_SCALE_FACTOR,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def vae_config(block_out_channels: tuple[int, ...] = (64, 128), scaling_factor: float = 1.0) -> dict:
    """One downsampling stage: 32x32x3 <-> 16x16x4."""
    depth = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def text_encoder_config(vocab_size: int = VOCAB_SIZE, num_hidden_layers: int = 3) -> dict:
    """A small CLIP text transformer; token ids follow the truncated tokenizer."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def scheduler_config() -> dict:
    """DDPM's linear betas (Ho et al., 2020), 1000 steps, epsilon prediction; sampled with DPM-Solver++."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="linspace",
        steps_offset=1,  # what StableDiffusionPipeline writes into any scheduler it is given
    )


def build_unet(**kwargs) -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_config(**kwargs))


def build_vae(**kwargs) -> AutoencoderKL:
    return AutoencoderKL(**vae_config(**kwargs))


def build_text_encoder(**kwargs):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config(**kwargs)))


# CLIP text encoders' tensors, named as every transformers release loads them into both CLIPTextModel and
# CLIPTextModelWithProjection (the embedded DiT's class): under ``text_model.``. transformers 5's CLIPTextModel
# saves them without it, a form that CLIPTextModelWithProjection reads only from transformers 5.24 on (5.17 left
# the DiT's text encoder at random with only a warning).
CLIP_PREFIX = "text_model."


def write_canonical_clip_names(path: str | Path) -> None:
    """Rewrite the safetensors file at ``path`` (a CLIP text encoder's) with every tensor under ``CLIP_PREFIX``."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    save_file({k if k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k: v for k, v in state.items()}, path,
              metadata={"format": "pt"})


def clip_state_for(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (tensors named with or without ``CLIP_PREFIX``) renamed to ``model``'s own names; KeyError names a
    tensor that fits neither."""
    own = model.state_dict().keys()
    renamed = {}
    for key, value in state.items():
        bare = key.removeprefix(CLIP_PREFIX)
        name = next((n for n in (key, bare, CLIP_PREFIX + bare) if n in own), None)
        if name is None:
            raise KeyError(f"{key!r} is not a tensor of {type(model).__name__}")
        renamed[name] = value
    return renamed


def build_scheduler() -> DPMSolverMultistepScheduler:
    """Any diffusers scheduler loads from the saved config too: ``from_config`` takes the betas it knows."""
    return DPMSolverMultistepScheduler(**scheduler_config())


def load_embedded_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """The shipped model as a StableDiffusionPipeline; float32 on CPU unless ``dtype`` is given."""
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model is not shipped at {EMBEDDED_MODEL_DIR}")
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        EMBEDDED_MODEL_DIR,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
