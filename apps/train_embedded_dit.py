"""Train the embedded mini Stable Diffusion 3 (``accel.embedded_dit``) on CIFAR-10: rectified flow on a DiT.

Rectified flow (Liu et al., 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow") as Stable Diffusion 3 trains it (Esser et al., 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis"): x_t = (1 - t) x_0 + t noise, the SD3Transformer2DModel predicts the
velocity noise - x_0 under a plain mean-squared error, t is drawn from the logit-normal distribution
(sigmoid of a normal draw, mean 0 and std 1) and reaches the model as 1000 t, the scale of
FlowMatchEulerDiscreteScheduler's timesteps. The autoencoder, text encoder and tokenizer are mini-sd-cifar10's
and stay frozen: the training images and their mirror images are encoded once (posterior mean and std), and
the captions (the UNet model's templates for each class, and the empty caption for 10% of the samples, for
classifier-free guidance) once, through the pipeline's own ``encode_prompt``; a step runs the transformer alone.

Seeded and resumable as ``apps/train_embedded.py`` (same options: ``--max-steps``, ``--time-budget``,
``--checkpoint-every``, ``--init-from`` an exported pipeline whose fp16 transformer to start from with a fresh
optimizer). The EMA weights are exported as a pipeline folder, ``--out``/pipeline: the transformer in fp16,
the scheduler, and links to the shared components (``accel.embedded_dit.save_pipeline``).

    python -m apps.train_embedded_dit --out out/dit --max-steps 100000 --time-budget 480 --compile
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file

from accel.embedded_dit import DEPTH, FLOW_SHIFT, HEAD_DIM, WIDTH, build_scheduler, build_transformer, save_pipeline
from apps.train_embedded import EMA, Checkpoint, CompileFallback, TrainingLoop, add_training_args, load_train_images, make_accelerator
from distill.data import class_captioned, encode_latents, sample_latent_batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser, init_from="transformer")
    parser.add_argument("--logit-mean", type=float, default=0.0, help="mean of the logit-normal timestep density")
    parser.add_argument("--logit-std", type=float, default=1.0, help="its standard deviation")
    parser.add_argument("--shift", type=float, default=FLOW_SHIFT, help="timestep shift of the exported scheduler")
    # Architecture; the defaults are the shipped model's, smaller values are for tests.
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    args = parser.parse_args(argv)
    args.max_steps = args.max_steps if args.max_steps is not None else 40000
    args.batch_size = args.batch_size or 512
    args.lr = args.lr or 4e-4
    return args


def rectified_flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latent (1 - sigma) x0 + sigma noise and the velocity noise - x0 the transformer learns."""
    return (1 - sigma) * x0 + sigma * noise, noise - x0


@torch.no_grad()
def encode_training_set(args: argparse.Namespace, transformer, device: torch.device):
    """Latents of the training set and the caption embeddings (the empty caption last), from the frozen encoders."""
    from diffusers import StableDiffusion3Pipeline

    # The pipeline folder is written first so that the text side is exactly the one that will ship.
    folder = save_pipeline(transformer, args.out / "pipeline", shift=args.shift)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer, local_files_only=True).to(device)
    latents = encode_latents(pipe.vae, class_captioned(*load_train_images(args)))
    prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
        prompt=list(latents.captions) + [""], prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
    )
    return latents, prompt_embeds.float(), pooled_embeds.float()


def train(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(args)
    device = accelerator.device
    transformer = build_transformer(width=args.width, depth=args.depth, head_dim=args.head_dim)
    if args.init_from is not None:
        transformer.load_state_dict(load_file(args.init_from / "transformer" / "diffusion_pytorch_model.safetensors"))
        accelerator.print(f"initialised the transformer from {args.init_from}")
    latents, prompt_embeds, pooled_embeds = encode_training_set(args, transformer, device)

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    prepared, optimizer = accelerator.prepare(transformer.train(), optimizer)
    raw = accelerator.unwrap_model(prepared)
    ema = EMA(raw, args.ema_decay)
    checkpoint = Checkpoint(args.out / "transformer_checkpoint", {"transformer": raw}, optimizer, emas={"transformer": ema})
    loop = TrainingLoop(args, checkpoint, accelerator, "dit")
    run_step = CompileFallback(prepared, args.compile, accelerator)
    # The pipeline passes the scheduler's timesteps, sigma * num_train_timesteps.
    timestep_scale = build_scheduler().config.num_train_timesteps
    while loop.running():
        step = loop.step
        # Per-step generator seeded by (seed, step): a resumed run draws the batches an unbroken one would.
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
        x0, caption = sample_latent_batch(latents, args.batch_size, generator, cfg_dropout=args.cfg_dropout)
        normal = torch.randn(args.batch_size, device=device, generator=generator)
        sigma = torch.sigmoid(args.logit_mean + args.logit_std * normal).view(-1, 1, 1, 1)
        noisy, target = rectified_flow_pair(x0, torch.randn(x0.shape, device=device, generator=generator), sigma)

        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)

        def forward_backward(model) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with accelerator.autocast():
                velocity = model(
                    hidden_states=noisy,
                    timestep=sigma.flatten() * timestep_scale,
                    encoder_hidden_states=prompt_embeds[caption],
                    pooled_projections=pooled_embeds[caption],
                ).sample
            loss = (velocity.float() - target).square().mean()
            accelerator.backward(loss)
            return loss

        loss = run_step(forward_backward)
        accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        optimizer.step()
        ema.update(raw, step)
        loop.advance(loss)
    loop.finish()

    ema.copy_to(raw)
    save_pipeline(raw.eval(), args.out / "pipeline", shift=args.shift)
    result = {
        "steps": loop.step,
        "train_seconds": round(loop.seconds, 1),
        "batch_size": args.batch_size,
        "samples_seen": loop.step * args.batch_size,
        "mean_loss_last_100_steps": loop.mean_loss,
        "init_from": str(args.init_from) if args.init_from else None,
        "transformer_parameters": sum(p.numel() for p in raw.parameters()),
    }
    (args.out / "dit_result.json").write_text(json.dumps(result, indent=2))
    accelerator.print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
