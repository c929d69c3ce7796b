"""Published Stable Diffusion architectures with random weights, for speed benchmarks only.

Speed does not depend on weight values, so the SD1.5, SD2.1 and SDXL pipelines are built from
their published configs (no download) with randomly initialised weights on the target device.
Quality is measured on the embedded model instead.
"""

from __future__ import annotations

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False)

ARCHS = ("sd15", "sd21", "sdxl", "embedded")
DEFAULT_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024, "embedded": 32}


def _tokenizer():
    from transformers import CLIPTokenizer

    from accel.embedded import EMBEDDED_MODEL_DIR

    # Any CLIP BPE works for speed: prompts are padded to 77 tokens either way.
    return CLIPTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR / "tokenizer"))


def build_pipeline(arch: str, device: str = "cuda", dtype: torch.dtype = torch.float16):
    """A pipeline of architecture `arch` with random weights (the embedded model: its real weights)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch == "embedded":
        from accel.embedded import load_embedded_pipeline

        return load_embedded_pipeline(device=device, dtype=dtype)
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "sdxl":
            unet = UNet2DConditionModel(**SDXL_UNET)
            vae = AutoencoderKL(**SD_VAE, scaling_factor=0.13025, force_upcast=False)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
        else:
            unet = UNet2DConditionModel(**(SD15_UNET if arch == "sd15" else SD21_UNET))
            vae = AutoencoderKL(**SD_VAE, scaling_factor=0.18215)
            text_encoder = CLIPTextModel(CLIPTextConfig(**(CLIP_L if arch == "sd15" else OPENCLIP_H)))
    prediction = "v_prediction" if arch == "sd21" else "epsilon"
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)
