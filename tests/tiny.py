"""Tiny random Stable Diffusion / SDXL components built from configs, seeded, on CPU (no Hub)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from apps.make_tokenizer import bytes_to_unicode


def write_tiny_tokenizer(folder: Path, merges: tuple[str, ...] = ("o f</w>", "p h", "ph o")) -> Path:
    """A valid CLIP BPE tokenizer folder: byte alphabet, a few merges, the two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    return folder


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder)))


def tiny_text_encoder(with_projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=hidden_size, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, projection_dim=32,
        hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    ).eval()


def tiny_unet(sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    if sdxl:
        kwargs.update(
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
        )
    return UNet2DConditionModel(**kwargs).eval()


def tiny_sd_pipeline(tmp: Path, pipeline_class=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cls = pipeline_class or StableDiffusionPipeline
    pipe = cls(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(tmp / "tokenizer"),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                                set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(tmp: Path, pipeline_class=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    cls = pipeline_class or StableDiffusionXLPipeline
    pipe = cls(
        unet=tiny_unet(sdxl=True), vae=tiny_vae(), text_encoder=tiny_text_encoder(),
        text_encoder_2=tiny_text_encoder(with_projection=True), tokenizer=tiny_tokenizer(tmp / "tokenizer"),
        tokenizer_2=tiny_tokenizer(tmp / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps: int = 2, seed: int = 0, **kwargs):
    """One seeded call returning the output as a numpy array."""
    kwargs.setdefault("prompt", "a photo of a horse")
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images


# ---- DiT pipelines (PixArt-Alpha, Stable Diffusion 3, Flux): tiny transformers, the CLIP tokenizer above for
# every text encoder (T5 included: its ids stay within the tiny vocabulary), a VAE with SD3/Flux latent scaling.


def tiny_t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=1000, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_flow_vae():
    """`tiny_vae` with the shift and scale that SD3 / Flux pipelines read from the VAE config."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        shift_factor=0.0609, scaling_factor=1.5305,
    ).eval()


def tiny_pixart_pipeline(tmp: Path, num_layers: int = 4, pipeline_class=None):
    """PixArt-Alpha (or `pipeline_class`: PixArt-Sigma) with a tiny transformer; call it with
    `use_resolution_binning=False` at 32 px."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8, norm_num_groups=32,
    ).eval()
    pipe = (pipeline_class or PixArtAlphaPipeline)(
        tokenizer=tiny_tokenizer(tmp / "tokenizer"), text_encoder=tiny_t5_encoder(), vae=tiny_vae(), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(tmp: Path, num_layers: int = 4):
    """Stable Diffusion 3 with two tiny CLIP encoders and no T5 (the pipeline pads with zeros)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flow_vae(),
        text_encoder=tiny_text_encoder(with_projection=True), tokenizer=tiny_tokenizer(tmp / "tokenizer"),
        text_encoder_2=tiny_text_encoder(with_projection=True), tokenizer_2=tiny_tokenizer(tmp / "tokenizer_2"),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(tmp: Path, num_single_layers: int = 2):
    """Flux with two dual-stream and two (or `num_single_layers`) single-stream blocks; call it with a small
    `max_sequence_length`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flow_vae(),
        text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(tmp / "tokenizer"),
        text_encoder_2=tiny_t5_encoder(), tokenizer_2=tiny_tokenizer(tmp / "tokenizer_2"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_pipeline(tmp: Path | None = None, num_layers: int = 4, scheduler=None):
    """Sana with a tiny transformer and DC-AE and no text encoder: call it with `tiny_sana_inputs()` (prompt
    embeddings and masks in)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32,
    ).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41,
    ).eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_inputs(guidance_scale: float = 3.0) -> dict:
    """The call arguments `tiny_sana_pipeline` takes in place of a prompt (seeded embeddings, full masks)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 6, dtype=torch.long)
    return dict(prompt=None, prompt_embeds=torch.randn(1, 6, 8, generator=g), prompt_attention_mask=mask,
                negative_prompt=None, negative_prompt_embeds=torch.randn(1, 6, 8, generator=g),
                negative_prompt_attention_mask=mask, use_resolution_binning=False, guidance_scale=guidance_scale)


class GaussianData:
    """Data N(mu, diag(sd^2)) of `dim` features: its exact denoiser is known in closed form, and so is the
    probability-flow ODE's solution x(s) = mu + (x(s0) - mu) * sqrt((sd^2 + s^2) / (sd^2 + s0^2))."""

    def __init__(self, dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.mu = torch.randn(1, dim, generator=generator, dtype=torch.float64)
        self.sd = torch.rand(1, dim, generator=generator, dtype=torch.float64) * 1.5 + 0.2

    def start(self, batch: int, seed: int, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit noise and the sampler's starting point at `sigma_max` (VE scale: noise * sqrt(1 + sigma_max^2))."""
        noise = torch.randn(batch, self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return noise, noise * math.sqrt(1 + sigma_max**2)

    def exact(self, x_start: torch.Tensor, sigma, sigma_max: float) -> torch.Tensor:
        """The probability-flow ODE's solution at `sigma` from `x_start` at `sigma_max`."""
        return self.mu + (x_start - self.mu) * ((self.sd**2 + sigma**2) / (self.sd**2 + sigma_max**2)).sqrt()

    def denoiser(self, x, sigma):
        s = sigma.reshape(-1, 1)
        return self.mu + self.sd**2 / (self.sd**2 + s**2) * (x - self.mu)


class FlowGaussianData(GaussianData):
    """`GaussianData` seen by a flow-matching model, `x = (1 - s) * x0 + s * noise`: its exact denoiser
    D(x, s) = mu + (1 - s) sd^2 / v(s) * (x - (1 - s) mu), v(s) = (1 - s)^2 sd^2 + s^2, and the flow ODE's
    solution x(s) = (1 - s) mu + (x(s0) - (1 - s0) mu) * sqrt(v(s) / v(s0)) are known in closed form."""

    def variance(self, s):
        return (1 - s) ** 2 * self.sd**2 + s**2

    def start(self, batch: int, seed: int, sigma_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit noise and the sampler's starting point at `sigma_max` (at sigma 1, the noise itself)."""
        noise = torch.randn(batch, self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return noise, (1 - sigma_max) * self.mu + noise * self.variance(sigma_max).sqrt()

    def exact(self, x_start: torch.Tensor, sigma, sigma_max: float = 1.0) -> torch.Tensor:
        ratio = (self.variance(sigma) / self.variance(sigma_max)).sqrt()
        return (1 - sigma) * self.mu + (x_start - (1 - sigma_max) * self.mu) * ratio

    def denoiser(self, x, sigma):
        s = sigma.reshape(-1, 1)
        return self.mu + (1 - s) * self.sd**2 / self.variance(s) * (x - (1 - s) * self.mu)


def random_lora(unet, rank: int, seed: int = 0, targets=("to_q", "to_k", "to_v", "to_out.0"), std: float = 0.1) -> dict:
    """A random LoRA of rank `rank` on `unet`'s attention projections: a state dict in diffusers' format (keys
    "unet.<layer>.lora_A.weight" / "lora_B.weight"), which `load_lora_weights` takes as it is."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{target}") for target in targets):
            state_dict[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
            state_dict[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * std
    return state_dict
