"""The second embedded model: a mini Stable Diffusion 3, a flow-matching DiT trained on CIFAR-10.

Stable Diffusion 3's architecture and objective (Esser et al., 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis"): an MM-DiT (``SD3Transformer2DModel``, joint text-image attention,
adaLN-Zero timestep and pooled-text conditioning) trained on rectified flow (Liu et al., 2022, "Flow
Straight and Fast"), sampled with ``FlowMatchEulerDiscreteScheduler``. It is sized to the first embedded
model (``accel.embedded``): 16x16x4 latents, patch size 2, so 64 image tokens.

The transformer and the scheduler are its own. The autoencoder, the CLIP text encoder and the tokenizer are
mini-sd-cifar10's, shared through relative links inside ``accel/models`` rather than copied (only their
configs are new): SD3 reads two CLIP encoders (here the same one twice, 2 x 256 = 512 features) and a T5
encoder.
``CLIPTextModelWithProjection`` loads the shared ``CLIPTextModel`` weights through a sharded-checkpoint
index whose second shard is an identity ``text_projection``, so the pooled text embedding is CLIP's pooled
output unchanged. The T5 slot holds an empty encoder (no layers, a three-token vocabulary, zero
embeddings): it gives the zeros SD3's pipeline feeds without T5, and unlike ``text_encoder_3=None`` it
lets a plain ``from_pretrained`` load the folder (diffusers requires every non-optional component).

The folder ``accel/models/mini-sd3-cifar10`` loads with plain diffusers, offline:
``DiffusionPipeline.from_pretrained(EMBEDDED_DIT_DIR)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from .embedded import EMBEDDED_MODEL_DIR, IMAGE_SIZE, LATENT_CHANNELS, TEXT_HIDDEN_SIZE, VAE_SCALE_FACTOR

EMBEDDED_DIT_NAME = "mini-sd3-cifar10"
EMBEDDED_DIT_DIR = Path(__file__).resolve().parent / "models" / EMBEDDED_DIT_NAME

# Sampling defaults: the FlowMatch Euler steps of SD3's pipeline, and the guidance of the model card.
EMBEDDED_DIT_STEPS = 28
EMBEDDED_DIT_GUIDANCE = 5.0
# The scheduler's timestep shift sigma' = s sigma / (1 + (s - 1) sigma); SD3 uses 3 at 1024 px, and 64 tokens
# need less. Any shift loads with ``FlowMatchEulerDiscreteScheduler.from_config(config, shift=s)``.
FLOW_SHIFT = 1.0

PATCH_SIZE = 2
# 4.6 M parameters, 9.3 MB in fp16: a sixth block (11.2 MB) would leave the repository, with the device machine's
# wheels and the CIFAR-10 test set, too near its 64 MiB transfer limit, and take the CPU generation time from 1.14x
# to 1.35x the UNet model's (benchmarks/embedded_dit/cpu_speed.py, one thread).
WIDTH, DEPTH, HEAD_DIM = 160, 5, 32
# Two CLIP encoders side by side (the same one twice): SD3 concatenates their features and pooled outputs.
JOINT_ATTENTION_DIM = 2 * TEXT_HIDDEN_SIZE

TEXT_WEIGHTS_NAME = "text_model.safetensors"
PROJECTION_WEIGHTS_NAME = "text_projection.safetensors"


def transformer_config(width: int = WIDTH, depth: int = DEPTH, head_dim: int = HEAD_DIM) -> dict:
    """An MM-DiT on 16x16x4 latents, patch 2, with RMS norm on queries and keys (SD3's QK-normalization, which
    keeps attention logits from growing in mixed-precision training); sine-cosine positions for up to twice
    the native size."""
    latent_size = IMAGE_SIZE // VAE_SCALE_FACTOR
    return dict(
        sample_size=latent_size,
        patch_size=PATCH_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=depth,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=width,
        pooled_projection_dim=JOINT_ATTENTION_DIM,
        # The table of positions is stored with the weights: SD3's 96 x 96 would be most of the file.
        pos_embed_max_size=2 * latent_size // PATCH_SIZE,
        qk_norm="rms_norm",
    )


def build_transformer(**kwargs) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**transformer_config(**kwargs))


def build_scheduler(shift: float = FLOW_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def resolve_model(model: str | os.PathLike | None) -> str | os.PathLike | None:
    """This model's folder for its name, anything else unchanged; FileNotFoundError while it has no weights."""
    if model != EMBEDDED_DIT_NAME:
        return model
    if not (EMBEDDED_DIT_DIR / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"the embedded DiT {EMBEDDED_DIT_NAME} has no trained transformer weights in {EMBEDDED_DIT_DIR / 'transformer'} "
            f"(see {EMBEDDED_DIT_DIR / 'README.md'}); train it with "
            "`bash benchmarks/embedded_dit/train.sh` on a GPU, or use the embedded UNet model (the default)")
    return EMBEDDED_DIT_DIR


def check_shared_text_encoder(text_encoder, shared_dir: str | os.PathLike = EMBEDDED_MODEL_DIR) -> None:
    """Raise unless ``text_encoder`` holds the shared CLIP weights.

    When the shared file named its tensors as transformers 5's ``CLIPTextModel`` saves them (no ``text_model.``
    prefix), transformers 5.17 (the GPU machine's on 2026-12-02) initialised ``CLIPTextModelWithProjection`` at
    random with only a warning, so prompts became noise that differed on every load: the cause of the first
    training runs' failures. The file now uses the prefixed names every release reads (``CLIP_PREFIX``); this
    check stays for any other file or release."""
    import transformers
    from safetensors import safe_open

    with safe_open(Path(shared_dir) / "text_encoder" / "model.safetensors", "pt") as f:
        name = next(key for key in f.keys() if key.endswith("token_embedding.weight"))
        expected = f.get_tensor(name)
    actual = text_encoder.get_input_embeddings().weight.detach().cpu().to(expected.dtype)
    if not torch.equal(actual, expected):
        raise RuntimeError(
            f"the text encoder did not load {EMBEDDED_MODEL_DIR.name}'s CLIP weights (transformers "
            f"{transformers.__version__} initialised it at random: it does not map the shared file's tensor names "
            "onto CLIPTextModelWithProjection); name every tensor of the file under 'text_model.' "
            "(accel.embedded.write_canonical_clip_names), which transformers 5.17 and 5.24 both load exactly")


def is_embedded_dit(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` (a name or a folder) is this model."""
    return model is not None and (model == EMBEDDED_DIT_NAME or Path(model).resolve() == EMBEDDED_DIT_DIR)


def _link(target: Path, link: Path) -> None:
    """A relative link, so the folder stays valid wherever the repository is checked out."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_shared_components(out_dir: Path, shared_dir: Path) -> None:
    """vae/, text_encoder(_2)/, tokenizer(_2)/ pointing at ``shared_dir``'s files; only configs are new."""
    from safetensors import safe_open

    vae_dir = out_dir / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    vae_config = json.loads((shared_dir / "vae" / "config.json").read_text())
    vae_config["shift_factor"] = 0.0  # SD3 adds the config's shift_factor when decoding; SD's VAE has none
    _write_json(vae_dir / "config.json", vae_config)
    _link(shared_dir / "vae" / "diffusion_pytorch_model.safetensors", vae_dir / "diffusion_pytorch_model.safetensors")

    text_dir = out_dir / "text_encoder"
    text_dir.mkdir(parents=True, exist_ok=True)
    text_config = json.loads((shared_dir / "text_encoder" / "config.json").read_text())
    text_config["architectures"] = ["CLIPTextModelWithProjection"]
    _write_json(text_dir / "config.json", text_config)
    shared_weights = shared_dir / "text_encoder" / "model.safetensors"
    _link(shared_weights, text_dir / TEXT_WEIGHTS_NAME)
    identity = torch.eye(text_config["projection_dim"], text_config["hidden_size"], dtype=torch.float16)
    save_file({"text_projection.weight": identity}, text_dir / PROJECTION_WEIGHTS_NAME, metadata={"format": "pt"})
    with safe_open(shared_weights, "pt") as f:
        weight_map = dict.fromkeys(f.keys(), TEXT_WEIGHTS_NAME)
    weight_map["text_projection.weight"] = PROJECTION_WEIGHTS_NAME
    _write_json(text_dir / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})

    _link(text_dir, out_dir / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        _link(shared_dir / "tokenizer", out_dir / name)


def _write_empty_t5(out_dir: Path) -> None:
    """A T5 encoder with no layers and zero embeddings over a three-token vocabulary: every prompt gives zeros."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer_dir = out_dir / "tokenizer_3"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    _write_json(tokenizer_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
    })
    config = T5Config(vocab_size=len(vocab), d_model=JOINT_ATTENTION_DIM, num_layers=0, num_heads=1, d_kv=8, d_ff=8,
                      dtype="float32")
    encoder = T5EncoderModel(config)
    torch.nn.init.zeros_(encoder.shared.weight)
    encoder.to(torch.float16).save_pretrained(out_dir / "text_encoder_3")
    # As for the CLIP encoder: fp16 on disk, float32 from a plain from_pretrained.
    config_path = out_dir / "text_encoder_3" / "config.json"
    _write_json(config_path, {**json.loads(config_path.read_text()), "dtype": "float32"})


def save_pipeline(transformer: SD3Transformer2DModel, out_dir: str | os.PathLike, *, shift: float = FLOW_SHIFT,
                  shared_dir: str | os.PathLike = EMBEDDED_MODEL_DIR) -> Path:
    """A StableDiffusion3Pipeline folder: ``transformer`` in fp16, the scheduler, links to the shared parts."""
    import diffusers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_shared_components(out_dir, Path(shared_dir).resolve())
    _write_empty_t5(out_dir)
    transformer.save_pretrained(out_dir / "transformer", safe_serialization=True)
    weights = out_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    build_scheduler(shift).save_pretrained(out_dir / "scheduler")
    clip = ["transformers", "CLIPTextModelWithProjection"]
    tokenizer = ["transformers", "CLIPTokenizer"]
    _write_json(out_dir / "model_index.json", {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": clip,
        "text_encoder_2": clip,
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "tokenizer_3": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return out_dir
