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

The text reaches the transformer through two linear layers, ``context_embedder`` (the 77 CLIP tokens, SD3's
penultimate hidden states) and ``time_text_embed.text_embedder.linear_1`` (the pooled embedding). Those inputs
are far from centred: a token's norm is about 125 (mostly which position it is), its class only about a fifth of
that, and the pooled embeddings of the ten classes differ by 7% of their norm, so gradient steps on those layers
move mostly along the shared part. With ``--whiten-text`` (off by default: its effect on training is not measured
yet; the first runs failed for another reason, ``accel.embedded_dit.check_shared_text_encoder``) each of the two layers trains on whitened inputs, the
caption features minus their mean, rotated onto their principal axes and divided by the axes' standard
deviations (``WhitenedLinear``; floored at 1e-3 of the largest variance, so directions the captions never use
stay quiet); the class then makes about 90% of a whitened token's norm. The whitening is a fixed linear map, so
the export folds it into the layer's weight and bias and ships a stock ``SD3Transformer2DModel``.

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

from accel.embedded_dit import (
    DEPTH,
    FLOW_SHIFT,
    HEAD_DIM,
    WIDTH,
    build_scheduler,
    build_transformer,
    check_shared_text_encoder,
    save_pipeline,
)
from apps.train_embedded import EMA, Checkpoint, CompileFallback, TrainingLoop, add_training_args, load_train_images, make_accelerator
from distill.data import class_captioned, encode_latents, sample_latent_batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser, init_from="transformer")
    parser.add_argument("--logit-mean", type=float, default=0.0, help="mean of the logit-normal timestep density")
    parser.add_argument("--logit-std", type=float, default=1.0, help="its standard deviation")
    parser.add_argument("--whiten-text", action=argparse.BooleanOptionalAction, default=False,
                        help="train the two text-input layers on whitened caption features (see the docstring)")
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


class WhitenedLinear(torch.nn.Module):
    """``linear(P (x - mean))`` with a fixed whitening ``P`` of ``features``: trains like ``linear`` on centred,
    unit-variance inputs; ``folded()`` is the one ``nn.Linear`` it equals, for export.

    ``P = diag(1 / sqrt(var + floor)) U^T`` over the eigenvectors ``U`` of the features' covariance, full rank (the
    floor is ``floor`` times the largest variance), so any ``Linear`` converts exactly: ``of_linear``."""

    def __init__(self, linear: torch.nn.Linear, features: torch.Tensor, floor: float = 1e-3):
        super().__init__()
        features = features.reshape(-1, features.shape[-1]).double()
        mean = features.mean(0)
        variance, axes = torch.linalg.eigh(torch.cov((features - mean).T))
        variance = variance.clamp_min(0)
        scale = (variance + floor * variance.max()).rsqrt()
        self.register_buffer("mean", mean.float())
        self.register_buffer("projection", (axes * scale).T.float())
        self.register_buffer("inverse", (axes / scale).float())  # P^-1 = U diag(1 / scale)
        self.linear = torch.nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
        self.of_linear(linear)

    @torch.no_grad()
    def of_linear(self, linear: torch.nn.Linear) -> None:
        """Take ``linear``'s function: W' = W P^-1, b' = b + W mean."""
        weight = linear.weight.float()
        self.linear.weight.copy_(weight @ self.inverse)
        self.linear.bias.copy_(linear.bias.float() + weight @ self.mean)

    def reset_parameters(self) -> None:
        """A fresh layer on the whitened inputs (PyTorch's default initialisation): what ``--whiten-text`` trains."""
        self.linear.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean.to(x.dtype)) @ self.projection.T.to(x.dtype))

    @torch.no_grad()
    def folded(self) -> torch.nn.Linear:
        layer = torch.nn.Linear(self.projection.shape[1], self.linear.out_features, device=self.mean.device)
        weight = self.linear.weight.float() @ self.projection
        layer.weight.copy_(weight)
        layer.bias.copy_(self.linear.bias.float() - weight @ self.mean)
        return layer


TEXT_LAYERS = ("context_embedder", "time_text_embed.text_embedder.linear_1")


def whiten_text_layers(transformer, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor, *, fresh: bool) -> None:
    """Replace the transformer's two text-input layers by ``WhitenedLinear`` on the caption features (CLIP's tokens
    only: the zero tokens of SD3's T5 slot would only move the mean), freshly initialised when ``fresh``, else
    computing what they computed."""
    tokens = prompt_embeds.reshape(-1, prompt_embeds.shape[-1])
    for name, features in zip(TEXT_LAYERS, (tokens[tokens.abs().amax(1) > 0], pooled_embeds)):
        parent, _, attr = name.rpartition(".")
        owner = transformer.get_submodule(parent) if parent else transformer
        layer = WhitenedLinear(getattr(owner, attr), features)
        if fresh:
            layer.reset_parameters()
        setattr(owner, attr, layer)


def fold_text_layers(transformer) -> None:
    """Undo ``whiten_text_layers``: each ``WhitenedLinear`` becomes the plain ``nn.Linear`` it computes."""
    for name in TEXT_LAYERS:
        parent, _, attr = name.rpartition(".")
        owner = transformer.get_submodule(parent) if parent else transformer
        layer = getattr(owner, attr)
        if isinstance(layer, WhitenedLinear):
            setattr(owner, attr, layer.folded())


@torch.no_grad()
def encode_training_set(args: argparse.Namespace, transformer, device: torch.device):
    """Latents of the training set and the caption embeddings (the empty caption last), from the frozen encoders."""
    from diffusers import StableDiffusion3Pipeline

    # The pipeline folder is written first so that the text side is exactly the one that will ship.
    folder = save_pipeline(transformer, args.out / "pipeline", shift=args.shift)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer, local_files_only=True).to(device)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        check_shared_text_encoder(encoder)
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
    if args.whiten_text:
        whiten_text_layers(transformer, prompt_embeds, pooled_embeds, fresh=args.init_from is None)

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

    # The exported function, checked on one fixed batch: the trained weights, their EMA, the folded EMA and the
    # saved fp16 pipeline's transformer must give about the training loss (a broken export shows here first).
    generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 - 1)
    x0, caption = sample_latent_batch(latents, min(args.batch_size, 256), generator, cfg_dropout=args.cfg_dropout)
    sigma = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(x0.shape[0], device=device, generator=generator))
    noisy, target = rectified_flow_pair(x0, torch.randn(x0.shape, device=device, generator=generator), sigma.view(-1, 1, 1, 1))

    @torch.no_grad()
    def check_loss(model) -> float:
        velocity = model(hidden_states=noisy, timestep=sigma * timestep_scale, encoder_hidden_states=prompt_embeds[caption],
                         pooled_projections=pooled_embeds[caption]).sample
        return round((velocity.float() - target).square().mean().item(), 5)

    export_check = {"trained": check_loss(raw.eval())}
    if run_step.current is not raw:
        with accelerator.autocast():
            export_check["trained_as_in_training"] = check_loss(run_step.current)
    ema.copy_to(raw)
    export_check["ema"] = check_loss(raw)
    fold_text_layers(raw)
    export_check["ema_folded"] = check_loss(raw)
    folder = save_pipeline(raw, args.out / "pipeline", shift=args.shift)
    saved = type(raw).from_pretrained(folder / "transformer", torch_dtype=torch.float32).to(device)
    export_check["saved_fp16"] = check_loss(saved)
    result = {
        "steps": loop.step,
        "train_seconds": round(loop.seconds, 1),
        "batch_size": args.batch_size,
        "samples_seen": loop.step * args.batch_size,
        "mean_loss_last_100_steps": loop.mean_loss,
        "init_from": str(args.init_from) if args.init_from else None,
        "whiten_text": args.whiten_text,
        "export_check_loss": export_check,
        "transformer_parameters": sum(p.numel() for p in raw.parameters()),
    }
    (args.out / "dit_result.json").write_text(json.dumps(result, indent=2))
    accelerator.print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
