"""Knowledge-distillation retraining of a pruned UNet (BK-SDM, Kim et al., 2023; normalised feature
distillation from LAPTOP-Diff, Zhang et al., 2024).

The loss is the denoising task loss, plus output KD (the student's prediction against the teacher's on the
same noisy latents), plus feature KD at every stage: the output of each down block, the mid block and each up
block that both UNets have at the same shape. Each feature term is divided by the mean square of the teacher's
feature, so that deep, large-magnitude stages do not drown the others (LAPTOP-Diff's normalisation).

``distill_unet`` trains with ``accelerate`` (one or several GPUs, bf16 autocast), keeps an EMA of the student
(``diffusers.training_utils.EMAModel``), can checkpoint activations, writes resumable checkpoints with
``Accelerator.save_state`` and picks them up again with ``load_state``. Teacher and student are SD 1.x/2.x UNets
(text states) or SDXL UNets (text states plus pooled text embeds and time ids, ``accel.conditioning``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from accel.errors import check_choice


@dataclass(frozen=True)
class KDConfig:
    """Loss weights and training settings; ``feature_weight`` multiplies the sum of the normalised stage terms."""

    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    min_snr_gamma: float | None = 5.0
    max_steps: int = 1000
    time_budget: float | None = None
    batch_size: int = 64
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self):
        for name in ("task_weight", "output_weight", "feature_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"KDConfig.{name}={getattr(self, name)!r} is not supported; valid: a number >= 0")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"KDConfig.min_snr_gamma={self.min_snr_gamma!r} is not supported; valid: a number > 0 or None")
        for name in ("max_steps", "batch_size", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"KDConfig.{name}={getattr(self, name)!r} is not supported; valid: an int >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"KDConfig.ema_decay={self.ema_decay!r} is not supported; valid: a number in [0, 1)")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"KDConfig.cfg_dropout={self.cfg_dropout!r} is not supported; valid: a number in [0, 1)")
        check_choice("KDConfig.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))


def stage_pairs(student, teacher) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """``(name, student block, teacher block)`` for every stage both UNets have: down blocks by index, the mid
    block, and up blocks aligned from the output end (a ``tiny`` student lacks the teacher's innermost stage)."""
    pairs = [(f"down_blocks.{i}", s, teacher.down_blocks[i]) for i, s in enumerate(student.down_blocks)]
    if student.mid_block is not None and teacher.mid_block is not None:
        pairs.append(("mid_block", student.mid_block, teacher.mid_block))
    offset = len(teacher.up_blocks) - len(student.up_blocks)
    pairs += [(f"up_blocks.{i}", s, teacher.up_blocks[i + offset]) for i, s in enumerate(student.up_blocks)]
    return pairs


@contextlib.contextmanager
def capture_features(modules: dict[str, torch.nn.Module]):
    """Record each module's output (the hidden states of a block's tuple) while inside; hooks removed on exit."""
    features: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():
            def hook(_module, _args, output, name=name):
                features[name] = output[0] if isinstance(output, tuple) else output
            handles.append(module.register_forward_hook(hook))
        yield features
    finally:
        for handle in handles:
            handle.remove()


class NoiseSchedule:
    """The teacher's training noise schedule: noising, the prediction target and Min-SNR weights."""

    def __init__(self, scheduler_config, device):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    def noisy_and_target(self, x0, noise, timesteps):
        a = self.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return noisy, target

    def loss_weights(self, timesteps, gamma: float | None) -> torch.Tensor:
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        snr = self.alphas_cumprod[timesteps] / (1 - self.alphas_cumprod[timesteps])
        denominator = snr if self.prediction_type == "epsilon" else snr + 1
        return (snr.clamp(max=gamma) / denominator).float()


def kd_loss(student, teacher, pairs, noisy, timesteps, encoder_hidden_states, target, weights, config: KDConfig,
            added_cond_kwargs: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (``task``, ``output_kd``, ``feature_kd``) on one batch; the teacher runs without grad."""
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    with torch.no_grad(), capture_features({n: t for n, _, t in pairs}) as teacher_features:
        teacher_out = teacher(noisy, timesteps, encoder_hidden_states, **extra, return_dict=False)[0].float()
    with capture_features({n: s for n, s, _ in pairs}) as student_features:
        student_out = student(noisy, timesteps, encoder_hidden_states, **extra, return_dict=False)[0].float()
    task = ((student_out - target).square().mean((1, 2, 3)) * weights).mean()
    output_kd = ((student_out - teacher_out).square().mean((1, 2, 3)) * weights).mean()
    feature_terms = []
    for name, _, _ in pairs:
        s, t = student_features[name].float(), teacher_features[name].float()
        if s.shape == t.shape:
            feature_terms.append((s - t).square().mean() / (t.square().mean() + 1e-6))
    feature_kd = torch.stack(feature_terms).sum() if feature_terms else student_out.new_zeros(())
    loss = config.task_weight * task + config.output_weight * output_kd + config.feature_weight * feature_kd
    return loss, {"task": task.detach(), "output_kd": output_kd.detach(), "feature_kd": feature_kd.detach()}


class _Progress:
    """Step count and training seconds, saved with the accelerate state."""

    def __init__(self):
        self.step, self.seconds = 0, 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])


def distill_unet(teacher, student, latents, caption_embeddings, scheduler_config, config: KDConfig,
                 out_dir: str | Path, *, accelerator=None, progress: bool = True) -> dict:
    """Retrain ``student`` against ``teacher`` on pre-encoded data; returns a result dict.

    ``latents``: a ``distill.data.LatentSet``; ``caption_embeddings``: the conditioning of its captions plus the
    unconditional one last - an ``accel.conditioning.Conditioning`` from ``encode_conditioning(pipe, captions)``
    (any SD-family pipeline, SDXL included), or for SD 1.x/2.x a tensor of text states
    (``distill.data.encode_captions``). Checkpoints go to ``out_dir/checkpoint`` and are resumed from there; at
    the end the student holds the EMA weights.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from accel.conditioning import as_conditioning, check_unet_conditioning

    from .data import sample_latent_batch

    conditioning = as_conditioning(caption_embeddings)
    check_unet_conditioning(teacher, conditioning, role="teacher UNet")
    check_unet_conditioning(student, conditioning, role="student UNet")
    if teacher.config.addition_embed_type != student.config.addition_embed_type:
        raise ValueError(f"teacher (addition_embed_type={teacher.config.addition_embed_type!r}) and student "
                         f"({student.config.addition_embed_type!r}) take different conditioning; prune the student "
                         "from this teacher (pruning.bk_sdm_unet / laptop_unet)")
    if len(conditioning) != len(latents.captions) + 1:
        raise ValueError(f"caption_embeddings has {len(conditioning)} rows; expected one per caption "
                         f"({len(latents.captions)}) plus the unconditional one last")
    out_dir = Path(out_dir)
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    teacher = teacher.to(device).eval().requires_grad_(False)
    student.train().requires_grad_(True)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    pairs_names = [name for name, _, _ in stage_pairs(student, teacher)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=0.0)
    prepared, optimizer = accelerator.prepare(student, optimizer)
    raw = accelerator.unwrap_model(prepared)
    pairs = [(n, s, t) for n, (_, s, t) in zip(pairs_names, stage_pairs(raw, teacher))]
    ema = EMAModel(raw.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=0.75)
    ema.to(device)
    state = _Progress()
    accelerator.register_for_checkpointing(ema, state)
    ckpt_dir = out_dir / "checkpoint"
    if (ckpt_dir / "custom_checkpoint_1.pkl").is_file():
        accelerator.load_state(str(ckpt_dir))
        accelerator.print(f"resumed KD from {ckpt_dir} at step {state.step}")

    schedule = NoiseSchedule(scheduler_config, device)
    conditioning = conditioning.to(device)
    data = replace(latents, mean=latents.mean.to(device), std=latents.std.to(device), choices=latents.choices.to(device))
    # Each process draws its own batches: seeded by (seed, step, rank), so a resumed run repeats an unbroken one.
    rank, per_process = accelerator.process_index, config.batch_size

    def save() -> None:
        accelerator.save_state(str(ckpt_dir))

    deadline = None if config.time_budget is None else time.monotonic() + config.time_budget
    bar = tqdm(total=config.max_steps, initial=state.step, desc="kd", disable=not (progress and accelerator.is_local_main_process))
    history, start = [], time.monotonic()
    while state.step < config.max_steps and (deadline is None or time.monotonic() < deadline):
        generator = torch.Generator(device=device).manual_seed((config.seed * 1_000_003 + state.step) * 64 + rank)
        x0, caption = sample_latent_batch(data, per_process, generator, cfg_dropout=config.cfg_dropout)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (per_process,), device=device, generator=generator)
        noisy, target = schedule.noisy_and_target(x0, noise, timesteps)
        weights = schedule.loss_weights(timesteps, config.min_snr_gamma)
        scale = min(1.0, (state.step + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * state.step / config.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * max(scale, 0.05)
        cond = conditioning[caption]
        with accelerator.autocast():
            loss, parts = kd_loss(prepared, teacher, pairs, noisy, timesteps, cond.encoder_hidden_states, target, weights,
                                  config, cond.added_cond_kwargs)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        optimizer.step()
        ema.step(raw.parameters())
        state.step += 1
        bar.update(1)
        if state.step % 50 == 0 or state.step == 1:
            values = {k: round(v.item(), 5) for k, v in {"loss": loss.detach(), **parts}.items()}
            history.append({"step": state.step, **values})
            bar.set_postfix(loss=f"{values['loss']:.4f}")
        if state.step % config.checkpoint_every == 0:
            state.seconds += time.monotonic() - start
            start = time.monotonic()
            save()
    bar.close()
    state.seconds += time.monotonic() - start
    save()
    ema.copy_to(raw.parameters())
    # Drop accelerate's mixed-precision forward wrapper: the returned student runs in its own dtype.
    raw = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    if config.gradient_checkpointing:
        raw.disable_gradient_checkpointing()
    raw.eval().requires_grad_(False)
    return {
        "steps": state.step,
        "train_seconds": round(state.seconds, 1),
        "batch_size": per_process * accelerator.num_processes,
        "feature_stages": [n for n, s, t in pairs],
        "loss_history": history,
        "student": raw,
    }
