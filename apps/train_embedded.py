"""Train the embedded mini Stable Diffusion on CIFAR-10: the autoencoder, then the UNet and text encoder.

Latent diffusion (Rombach et al., 2022) at CIFAR scale. Stage ``vae`` trains the KL autoencoder
(32x32x3 <-> 16x16x4) on L1 + L2 reconstruction with SD's small KL weight, then sets ``scaling_factor``
to one over the measured latent standard deviation. Stage ``unet`` trains the UNet and the CLIP text
encoder together, from scratch, on epsilon prediction (DDPM's linear betas, Min-SNR-5 weighting,
Hang et al., 2023), with captions drawn from several templates per class and 10% empty captions for
classifier-free guidance; it exports the EMA weights as a StableDiffusionPipeline folder in fp16.

Both stages are seeded and resumable: a checkpoint is written every ``--checkpoint-every`` steps and at
the end (``--max-steps`` or ``--time-budget`` seconds), and picked up on the next start. Where the full
checkpoint cannot travel (the device machine returns at most 64 MiB), ``--init-from`` continues from an
exported pipeline's fp16 EMA weights with a fresh optimizer; the model card says which runs did.

    python -m apps.train_embedded --stage vae --out out/embedded --max-steps 5000 --time-budget 140
    python -m apps.train_embedded --stage unet --out out/embedded --max-steps 100000 --time-budget 540
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from accel.embedded import (
    CIFAR10_CLASSES,
    EMBEDDED_MODEL_DIR,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    class_captions,
    clip_state_for,
    scheduler_config,
    write_canonical_clip_names,
)
from accel.quality.cifar import load_cifar10
from accel.quality.metrics import psnr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=["vae", "unet"])
    add_training_args(parser, init_from="UNet / text encoder")
    parser.add_argument("--tokenizer", type=Path, default=EMBEDDED_MODEL_DIR / "tokenizer")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    # Architecture; the defaults are the shipped model's, smaller values are for tests.
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--layers-per-block", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=3)
    args = parser.parse_args(argv)
    stage_defaults = {"vae": (4000, 256, 5e-4), "unet": (40000, 512, 5e-4)}[args.stage]
    args.max_steps = args.max_steps if args.max_steps is not None else stage_defaults[0]
    args.batch_size = args.batch_size or stage_defaults[1]
    args.lr = args.lr or stage_defaults[2]
    return args


def add_training_args(parser: argparse.ArgumentParser, *, init_from: str) -> None:
    """The options every embedded-model training run takes: data, length, optimizer, EMA, checkpoints, precision."""
    parser.add_argument("--out", type=Path, required=True, help="working folder: checkpoints, vae/, pipeline/")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with train.tar.gz / test.tar.gz")
    parser.add_argument("--synthetic", type=int, default=0, help="use N random images instead of CIFAR-10 (tests)")
    parser.add_argument("--init-from", type=Path, default=None, help=f"pipeline folder whose {init_from} to start from")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None, help="stop (and save) after this many seconds")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--ema-decay", type=float, default=0.9995)
    parser.add_argument("--cfg-dropout", type=float, default=0.1, help="share of empty captions")
    parser.add_argument("--checkpoint-every", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (falls back to eager if it fails)")


def load_train_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.synthetic:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (args.synthetic, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return images, torch.randint(0, 10, (args.synthetic,), generator=generator)
    return load_cifar10("train", args.data_dir)


def load_test_images(args: argparse.Namespace) -> torch.Tensor:
    if args.synthetic:
        return load_train_images(args)[0]
    return load_cifar10("test", args.data_dir)[0]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range SD's autoencoder works in."""
    return images.float() / 127.5 - 1.0


def save_tensors(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, path)


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in module.parameters()], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for shadow, param in zip(self.shadow, module.parameters()):
            param.copy_(shadow)

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        names = [name for name, _ in module.named_parameters()]
        return dict(zip(names, (s.contiguous() for s in self.shadow)))

    def load_state_dict(self, state: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
        for shadow, (name, _) in zip(self.shadow, module.named_parameters()):
            shadow.copy_(state[name])


class Checkpoint:
    """A stage's weights, EMA weights, optimizer state and progress in one folder, picked up on the next start."""

    def __init__(self, folder: Path, modules: dict[str, torch.nn.Module], optimizer, emas: dict[str, EMA] | None = None):
        self.folder, self.modules, self.optimizer, self.emas = folder, modules, optimizer, emas or {}

    def load(self, device: torch.device) -> tuple[int, float]:
        """(step, training seconds) of the saved run after loading it; (0, 0.0) when there is none."""
        if not (self.folder / "state.json").is_file():
            return 0, 0.0
        state = json.loads((self.folder / "state.json").read_text())
        for name, module in self.modules.items():
            module.load_state_dict(load_file(self.folder / f"{name}.safetensors", device=str(device)))
        for name, ema in self.emas.items():
            ema.load_state_dict(load_file(self.folder / f"{name}_ema.safetensors", device=str(device)), self.modules[name])
        self.optimizer.load_state_dict(torch.load(self.folder / "optimizer.pt", map_location=device, weights_only=True))
        return state["step"], state["seconds"]

    def save(self, step: int, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():
            save_tensors(module, self.folder / f"{name}.safetensors")
        for name, ema in self.emas.items():
            save_file(ema.state_dict(self.modules[name]), self.folder / f"{name}_ema.safetensors")
        torch.save(self.optimizer.state_dict(), self.folder / "optimizer.pt")
        (self.folder / "state.json").write_text(json.dumps({"step": step, "seconds": seconds}))


class TrainingLoop:
    """Steps, training seconds, progress bar and checkpoints of one stage, resumed from ``checkpoint``:
    ``while loop.running(): ...; loop.advance(loss)``, then ``loop.finish()``. Training ends at ``--max-steps``
    or after ``--time-budget`` seconds, whichever comes first."""

    def __init__(self, args: argparse.Namespace, checkpoint: Checkpoint, accelerator: Accelerator, desc: str):
        self.checkpoint, self.max_steps, self.checkpoint_every = checkpoint, args.max_steps, args.checkpoint_every
        self.step, self.seconds = checkpoint.load(accelerator.device)
        if self.step:
            accelerator.print(f"resumed {desc} from {checkpoint.folder} at step {self.step}")
        self.deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
        self.bar = tqdm(total=args.max_steps, initial=self.step, desc=desc, disable=not accelerator.is_local_main_process)
        self.losses, self.mean_loss = [], None
        self.start = time.monotonic()

    def running(self) -> bool:
        return self.step < self.max_steps and (self.deadline is None or time.monotonic() <= self.deadline)

    def advance(self, loss: torch.Tensor) -> None:
        """Count a finished step; the mean loss reaches the host once in 100 steps, not every step."""
        self.step += 1
        self.bar.update(1)
        self.losses.append(loss.detach())
        if self.step % 100 == 0:
            self.mean_loss, self.losses = torch.stack(self.losses).mean().item(), []
            self.bar.set_postfix(loss=f"{self.mean_loss:.4f}")
        if self.step % self.checkpoint_every == 0:
            self.save()

    def save(self) -> None:
        now = time.monotonic()
        self.seconds, self.start = self.seconds + now - self.start, now
        self.checkpoint.save(self.step, self.seconds)

    def finish(self) -> None:
        self.bar.close()
        self.save()


class CompileFallback:
    """Runs training steps through ``torch.compile(model)`` when asked; after a failure, eagerly from then on."""

    def __init__(self, model: torch.nn.Module, enabled: bool, accelerator: Accelerator):
        self.model, self.accelerator = model, accelerator
        self.current = torch.compile(model) if enabled else model

    def __call__(self, step_fn):
        try:
            return step_fn(self.current)
        except Exception as error:  # a failed compilation must not cost the run
            if self.current is self.model:
                raise
            self.accelerator.print(f"torch.compile failed, training eagerly: {error!r}"[:2000])
            self.current = self.model
            return step_fn(self.model)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """Seeded, TF32 on, bf16 autocast on CUDA unless ``--mixed-precision`` says otherwise; creates ``--out``."""
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    return Accelerator(mixed_precision=args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no"))


# ----------------------------------------------------------------------------------------------
# Stage 1: the autoencoder


def train_vae(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    device = accelerator.device
    images, _ = load_train_images(args)
    images = images.to(device)
    vae = build_vae(block_out_channels=tuple(args.vae_channels)).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    raw = accelerator.unwrap_model(vae)

    loop = TrainingLoop(args, Checkpoint(args.out / "vae_checkpoint", {"vae": raw}, optimizer), accelerator, "vae")
    kl_weight = 1e-6  # SD's autoencoder weight on the per-image KL sum against per-image reconstruction sums
    while loop.running():
        step = loop.step
        # Per-step generator seeded by (seed, step): a resumed run draws the batches an unbroken one would.
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(0, images.shape[0], (args.batch_size,), device=device, generator=generator)
        x = to_model_range(images[index])
        flip = torch.rand(x.shape[0], device=device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        lr_scale = min(1.0, (step + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(step, args.max_steps) / args.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * max(lr_scale, 0.02)
        with accelerator.autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample
        error = recon.float() - x
        rec_loss = (error.abs() + error.square()).flatten(1).sum(1).mean()
        loss = rec_loss + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        loop.advance(loss / 3072)  # shown per pixel value
    loop.finish()

    raw.eval()
    latents, recon_psnr = [], []
    test_images = load_test_images(args).to(device)
    with torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(args.seed)
        for chunk in images.split(1000):
            latents.append(raw.encode(to_model_range(chunk)).latent_dist.sample(generator=generator).float())
        for chunk in test_images.split(1000):
            recon = raw.decode(raw.encode(to_model_range(chunk)).latent_dist.mode()).sample
            recon_psnr.append(psnr((recon.float() + 1) / 2, chunk.float() / 255))
    latent_std = torch.cat(latents).std().item()
    raw.register_to_config(scaling_factor=round(1.0 / latent_std, 5))
    raw.save_pretrained(args.out / "vae")
    result = {
        "stage": "vae",
        "steps": loop.step,
        "train_seconds": round(loop.seconds, 1),
        "batch_size": args.batch_size,
        "latent_std": latent_std,
        "scaling_factor": raw.config.scaling_factor,
        "test_recon_psnr_db": torch.cat(recon_psnr).mean().item(),
        "num_parameters": sum(p.numel() for p in raw.parameters()),
    }
    (args.out / "vae_result.json").write_text(json.dumps(result, indent=2))
    accelerator.print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# Stage 2: the UNet and the text encoder


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image and of its mirror image, scaled by ``scaling_factor``."""
    means, stds = [], []
    for flip in (False, True):
        for chunk in images.split(1000):
            x = to_model_range(chunk)
            posterior = vae.encode(x.flip(3) if flip else x).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def caption_table(tokenizer) -> tuple[torch.Tensor, int]:
    """Token ids of every caption (templates x classes, then the empty caption), tokenized as the pipeline does."""
    captions = [text for name in CIFAR10_CLASSES for text in class_captions(name)] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids, len(class_captions(CIFAR10_CLASSES[0]))


def export_pipeline(unet, text_encoder, vae, tokenizer, out_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Weights stay fp16 on disk, but transformers loads a text encoder in its config's dtype: declare float32
    # so that a plain ``from_pretrained`` gives one dtype throughout (float32 unless ``dtype`` is given).
    write_canonical_clip_names(out_dir / "text_encoder" / "model.safetensors")  # the DiT's encoder class reads it too
    config_path = out_dir / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def train_unet(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    device = accelerator.device
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    vae = AutoencoderKL.from_pretrained(args.out / "vae", dtype=torch.float32).to(device).eval()
    images, labels = load_train_images(args)
    latent_mean, latent_std = encode_dataset(vae, images.to(device))
    labels = torch.cat([labels, labels]).to(device)
    caption_ids, num_templates = caption_table(tokenizer)
    caption_ids = caption_ids.to(device)
    empty_caption = caption_ids.shape[0] - 1

    unet = build_unet(block_out_channels=tuple(args.unet_channels), layers_per_block=args.layers_per_block).to(device)
    text_encoder = build_text_encoder(vocab_size=len(tokenizer), num_hidden_layers=args.text_layers).to(device)
    if args.init_from is not None:
        unet.load_state_dict(load_file(args.init_from / "unet" / "diffusion_pytorch_model.safetensors"))
        text_state = load_file(args.init_from / "text_encoder" / "model.safetensors")
        text_encoder.load_state_dict(clip_state_for(text_encoder, text_state), strict=False)  # buffers may be absent
        accelerator.print(f"initialised UNet and text encoder from {args.init_from}")
    unet_ema, text_ema = EMA(unet, args.ema_decay), EMA(text_encoder, args.ema_decay)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    raw_unet, raw_text = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)

    noise_schedule = scheduler_config()
    betas = torch.linspace(noise_schedule["beta_start"], noise_schedule["beta_end"], noise_schedule["num_train_timesteps"], dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = (snr.clamp(max=args.min_snr_gamma) / snr).float()

    checkpoint = Checkpoint(args.out / "unet_checkpoint", {"unet": raw_unet, "text_encoder": raw_text}, optimizer,
                            emas={"unet": unet_ema, "text_encoder": text_ema})
    loop = TrainingLoop(args, checkpoint, accelerator, "unet")
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    run_step = CompileFallback(unet, args.compile, accelerator)
    while loop.running():
        step = loop.step
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
        n = args.batch_size
        index = torch.randint(0, latent_mean.shape[0], (n,), device=device, generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, device=device, generator=generator)
        template = torch.randint(0, num_templates, (n,), device=device, generator=generator)
        caption = labels[index] * num_templates + template
        drop = torch.rand(n, device=device, generator=generator) < args.cfg_dropout
        caption = torch.where(drop, torch.full_like(caption, empty_caption), caption)
        timesteps = torch.randint(0, alphas_cumprod.shape[0], (n,), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        a = alphas_cumprod[timesteps].float().view(n, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).contiguous(memory_format=torch.channels_last)

        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)

        def forward_backward(model) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with accelerator.autocast():
                # Encode each distinct caption once per step, then gather: same gradients, a fraction of the work.
                hidden = text_encoder(caption_ids).last_hidden_state
                prediction = model(noisy, timesteps, hidden[caption]).sample
            loss = ((prediction.float() - noise).square().mean((1, 2, 3)) * loss_weight[timesteps]).mean()
            accelerator.backward(loss)
            return loss

        loss = run_step(forward_backward)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        unet_ema.update(raw_unet, step)
        text_ema.update(raw_text, step)
        loop.advance(loss)
    loop.finish()

    unet_ema.copy_to(raw_unet)
    text_ema.copy_to(raw_text)
    export_pipeline(raw_unet.eval(), raw_text.eval(), vae, tokenizer, args.out / "pipeline")
    result = {
        "stage": "unet",
        "steps": loop.step,
        "train_seconds": round(loop.seconds, 1),
        "batch_size": args.batch_size,
        "samples_seen": loop.step * args.batch_size,
        "init_from": str(args.init_from) if args.init_from else None,
        "unet_parameters": sum(p.numel() for p in raw_unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in raw_text.parameters()),
    }
    (args.out / "unet_result.json").write_text(json.dumps(result, indent=2))
    accelerator.print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    return (train_vae if args.stage == "vae" else train_unet)(args, accelerator)


if __name__ == "__main__":
    main()
