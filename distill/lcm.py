"""Latent consistency distillation: LCM (Luo et al. 2023, "Latent Consistency Models") and LCM-LoRA
(Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module").

A student learns the consistency function `f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_student(x_t, t)`
of a teacher's probability-flow ODE in latent space. Each training step noises a latent to a
timestep `t` of the distillation schedule (every k-th train timestep, k = num_train_timesteps //
original_inference_steps), moves it one interval to `s = t - k` with a teacher ODE solver under
classifier-free guidance (DDIM, or any sampler of `samplers/`), and pulls the student's
`f(x_t, t)` towards the target network's `f(x_s, s)` (Huber or L2). The target network is an
exponential moving average of the student (LCM), or the student itself without gradient
(decay 0, as LCM-LoRA).

Two students:
- "full": a copy of the teacher UNet with `time_cond_proj_dim` set, so that the guidance scale
  `w` is embedded (`StableDiffusionPipeline` passes `guidance_scale - 1` as `timestep_cond` and
  skips CFG); the new projection starts at zero, so the student starts equal to the teacher.
- "lora": a LoRA (peft) on the teacher UNet's attention, feed-forward and resnet layers, trained
  at a fixed guidance scale (or an unembedded range) and saved so that
  `pipe.load_lora_weights(folder)` loads it into any pipeline of the same base.

The teacher is a Stable Diffusion 1.x/2.x or SDXL pipeline; for SDXL every teacher, student and target
call also gets the pooled text embeds and time ids (`accel.conditioning`), and the LoRA is saved for
`StableDiffusionXLPipeline.load_lora_weights`.

Runs under `accelerate` (mixed precision, `save_state` / `load_state` for resume; batches are drawn
from a generator seeded by the step, so a resumed run sees the batches an unbroken one would).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from accel.conditioning import Conditioning, as_conditioning, check_unet_conditioning, takes_added_conditions
from samplers.denoiser import PREDICTION_TYPES, NoiseSchedule, UNetDenoiser
from samplers.lcm import DEFAULT_TIMESTEP_SCALING, lcm_boundary_scalings

VARIANTS = ("lora", "full")
LOSSES = ("huber", "l2")
# The UNet layers LCM-LoRA adapts: attention projections, feed-forward, resnet convolutions, resampling.
LCM_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
ADAPTER_NAME = "lcm"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SUMMARY_NAME = "lcm_distill.json"


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True)
class LCMDistillConfig:
    """How to distil. Defaults are LCM-LoRA's where the papers give them.

    Args:
        variant: "lora" (LCM-LoRA) or "full" (a full UNet with the guidance scale embedded).
        lora_rank, lora_alpha: LoRA rank and scale numerator (alpha None: equal to the rank).
        original_inference_steps: length of the distillation schedule; the skipping interval is
            k = num_train_timesteps // original_inference_steps (50 -> k = 20 on 1000 steps).
        solver: the teacher's ODE solver over one interval: "ddim" (each sample at its own
            timestep) or any name of `samplers.SAMPLER_NAMES` (one timestep per batch).
        guidance_scale: the teacher's classifier-free guidance scale when `guidance_range` is None.
        guidance_range: (low, high): a scale drawn uniformly per sample; the full student embeds it.
        guidance_embed_dim: `time_cond_proj_dim` of the full student.
        loss: "huber" (pseudo-Huber with constant `huber_c`) or "l2".
        ema_decay: the target network's EMA decay; None: 0.95 for "full", 0 (the student itself
            without gradient) for "lora".
        timestep_scaling: the boundary condition's timestep scaling (`LCMScheduler`'s).
        learning_rate: None: 1e-4 for "lora", 2e-5 for "full".
        gradient_checkpointing: recompute the student's activations in the backward pass (SDXL at
            1024 px on one GPU).
    """

    variant: str = "lora"
    lora_rank: int = 64
    lora_alpha: float | None = None
    original_inference_steps: int = 50
    solver: str = "ddim"
    guidance_scale: float = 7.5
    guidance_range: tuple[float, float] | None = None
    guidance_embed_dim: int = 256
    loss: str = "huber"
    huber_c: float = 0.001
    ema_decay: float | None = None
    timestep_scaling: float = DEFAULT_TIMESTEP_SCALING
    learning_rate: float | None = None
    batch_size: int = 64
    max_steps: int = 1000
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    time_budget: float | None = None
    checkpoint_every: int = 500
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        import samplers

        if self.variant not in VARIANTS:
            raise ValueError(f"LCMDistillConfig.variant={self.variant!r} is not supported; valid choices: {_choices(VARIANTS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"LCMDistillConfig.loss={self.loss!r} is not supported; valid choices: {_choices(LOSSES)}")
        if self.solver not in samplers.SAMPLER_NAMES:
            raise ValueError(
                f"LCMDistillConfig.solver={self.solver!r} is not supported; valid choices: {_choices(samplers.SAMPLER_NAMES)}"
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"LCMDistillConfig.mixed_precision={self.mixed_precision!r}; valid choices: 'no', 'fp16', 'bf16'")
        for name in ("lora_rank", "original_inference_steps", "guidance_embed_dim", "batch_size", "max_steps",
                     "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LCMDistillConfig.{name} must be a positive int, got {value!r}")
        if self.guidance_scale < 1:
            raise ValueError(f"LCMDistillConfig.guidance_scale must be >= 1 (1: no guidance), got {self.guidance_scale!r}")
        if self.guidance_range is not None:
            low, high = (float(v) for v in self.guidance_range)
            if not 1 <= low <= high:
                raise ValueError(f"LCMDistillConfig.guidance_range must be (low, high) with 1 <= low <= high, got {self.guidance_range!r}")
            object.__setattr__(self, "guidance_range", (low, high))
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"LCMDistillConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.huber_c <= 0 or self.timestep_scaling <= 0:
            raise ValueError("LCMDistillConfig.huber_c and timestep_scaling must be positive")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"LCMDistillConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"LCMDistillConfig.gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")

    @property
    def target_decay(self) -> float:
        return self.ema_decay if self.ema_decay is not None else (0.95 if self.variant == "full" else 0.0)

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (1e-4 if self.variant == "lora" else 2e-5)


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The `timestep_cond` `StableDiffusionPipeline` gives a UNet with `time_cond_proj_dim`: an
    embedding of `guidance_scale - 1` (CPU, float32), computed by the pipeline's own function."""
    from diffusers import StableDiffusionPipeline

    w = guidance_scale.detach().to("cpu", torch.float32) - 1
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def _check_teacher(pipe) -> None:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or not hasattr(pipe, "encode_prompt"):
        raise TypeError(
            f"{type(pipe).__name__} is not supported as an LCM teacher; supported: Stable Diffusion 1.x / 2.x "
            "and SDXL pipelines (a UNet2DConditionModel, their text encoders, a VAE)"
        )
    try:
        check_unet_conditioning(unet, role="teacher UNet")
    except ValueError as err:
        raise TypeError(str(err)) from None
    if takes_added_conditions(unet) and getattr(pipe, "text_encoder_2", None) is None:
        raise TypeError(f"{type(pipe).__name__} has an SDXL UNet but no text_encoder_2; supported: "
                        "StableDiffusionXLPipeline (base, both text encoders)")
    if unet.config.time_cond_proj_dim is not None:
        raise TypeError("the teacher UNet already embeds a guidance scale (time_cond_proj_dim is set): it is a "
                        "distilled student, not a teacher; supported: plain Stable Diffusion 1.x / 2.x / SDXL UNets")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"teacher prediction_type={prediction!r} is not supported; valid choices: {PREDICTION_TYPES}")


def make_student(teacher_unet, config: LCMDistillConfig):
    """The student UNet: the teacher's weights plus a zero guidance projection ("full") or a LoRA ("lora")."""
    from diffusers import UNet2DConditionModel

    if config.variant == "full":
        # entries the teacher left at their defaults are listed in `_use_default_values`, and
        # `from_config` would drop a change to one of them
        unet_config = {k: v for k, v in teacher_unet.config.items() if k != "_use_default_values"}
        student = UNet2DConditionModel.from_config(dict(unet_config, time_cond_proj_dim=config.guidance_embed_dim))
        missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
        if unexpected or any(not key.startswith("time_embedding.cond_proj") for key in missing):
            raise RuntimeError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # the student starts as the teacher
        return student.to(teacher_unet.device).train()
    from peft import LoraConfig

    student = copy.deepcopy(teacher_unet)
    if student.dtype != torch.float32:  # the LoRA trains in float32 (autocast does the rest)
        student.to(torch.float32)
    student.requires_grad_(False)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        target_modules=list(LCM_LORA_TARGET_MODULES),
    )
    student.add_adapter(lora, adapter_name=ADAPTER_NAME)
    return student.train()


def trainable_parameters(student) -> list[torch.nn.Parameter]:
    return [p for p in student.parameters() if p.requires_grad]


class LCMDistiller:
    """One teacher pipeline, one student, the target network and the optimizer; `loss(batch)`
    and `train_step(batch)` for a batch from `draw_batch`. `distill_lcm` runs the loop."""

    def __init__(self, pipe, config: LCMDistillConfig, accelerator=None):
        from accelerate import Accelerator

        _check_teacher(pipe)
        self.config = config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
        self.device = self.accelerator.device
        self.pipe = pipe
        self.teacher = pipe.unet.to(self.device).eval().requires_grad_(False)
        schedule_config = pipe.scheduler.config
        self.noise_schedule = NoiseSchedule.from_config(schedule_config)
        num_train_timesteps = self.noise_schedule.num_train_timesteps
        if config.original_inference_steps > num_train_timesteps:
            raise ValueError(
                f"original_inference_steps={config.original_inference_steps} exceeds the teacher's {num_train_timesteps} train timesteps"
            )
        self.skip = num_train_timesteps // config.original_inference_steps
        self.sigmas = self.noise_schedule.sigmas.to(self.device, torch.float32)
        self.student = make_student(self.teacher, config).to(self.device)
        if config.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        params = trainable_parameters(self.student)
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=1e-2)
        self.model, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        # The target network: an EMA copy of the student at a constant decay (LCM), or the student
        # itself without gradient (decay 0, LCM-LoRA).
        self.target = self.student
        if config.target_decay > 0:
            self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
            self.accelerator.register_for_checkpointing(self.target)
        names = [name for name, p in self.student.named_parameters() if p.requires_grad]
        target_params = dict(self.target.named_parameters())
        self._online = params
        self._averaged = [target_params[name] for name in names]
        self.step = 0
        self._teacher_denoiser = UNetDenoiser(self.teacher, schedule_config)
        self._student_denoiser = UNetDenoiser(self.model, schedule_config)
        self._target_denoiser = UNetDenoiser(self.target, schedule_config)

    # ------------------------------------------------------------------ data
    def draw_batch(self, latents, embeddings, step: int) -> dict:
        """A batch for `step`, from generators seeded by (seed, step): latents, caption conditioning,
        distillation-schedule indices, noise and guidance scales. `embeddings`: a `Conditioning` of the
        captions with the unconditional one last (`encode_conditioning`), or SD text states."""
        from .data import sample_latent_batch

        embeddings = as_conditioning(embeddings)
        check_unet_conditioning(self.teacher, embeddings, role="teacher UNet")
        config = self.config
        generator = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + step)
        host = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        x0, caption = sample_latent_batch(latents, config.batch_size, generator, cfg_dropout=0.0)
        n = x0.shape[0]
        count = n if config.solver == "ddim" else 1  # other solvers step the whole batch at one timestep
        index = torch.randint(0, config.original_inference_steps, (count,), generator=host).expand(n)
        if config.guidance_range is None:
            guidance = torch.full((n,), config.guidance_scale)
        else:
            low, high = config.guidance_range
            guidance = low + (high - low) * torch.rand(n, generator=host)
        return {
            "x0": x0,
            "cond": embeddings[caption].to(self.device),
            "uncond": embeddings[torch.full((n,), len(embeddings) - 1, dtype=torch.long)].to(self.device),
            "index": index.to(self.device),
            "noise": torch.randn(x0.shape, device=self.device, generator=generator),
            "guidance": guidance,
        }

    # ------------------------------------------------------------------ the consistency loss
    def _consistency(self, denoiser, x, sigma, t, cond: Conditioning, guidance_cond):
        """`f(x, t) = c_skip * x_vp + c_out * x0` in the VE form of `samplers` (x = x_vp / alpha)."""
        extra = {} if guidance_cond is None else {"timestep_cond": guidance_cond}
        x0 = denoiser(x, sigma, **cond.unet_kwargs(), **extra)
        c_skip, c_out = lcm_boundary_scalings(t.to(torch.float32), self.config.timestep_scaling)
        alpha = (1 + sigma**2).rsqrt()
        shape = (-1, 1, 1, 1)
        return c_skip.view(shape) * alpha.view(shape) * x + c_out.view(shape) * x0.float()

    def _teacher_x0(self, x, sigma, cond: Conditioning, uncond: Conditioning, guidance):
        both = Conditioning.cat([uncond, cond])
        both = self._teacher_denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both.unet_kwargs())
        x0_uncond, x0_cond = both.float().chunk(2)
        return x0_uncond + guidance.view(-1, 1, 1, 1) * (x0_cond - x0_uncond)

    @torch.no_grad()
    def teacher_step(self, x, sigma_t, sigma_s, cond, uncond, guidance):
        """The teacher's guided ODE solution from sigma_t to sigma_s (per sample for DDIM)."""
        if self.config.solver == "ddim":
            x0 = self._teacher_x0(x, sigma_t, cond, uncond, guidance)
            ratio = (sigma_s / sigma_t).view(-1, 1, 1, 1)
            return x0 + ratio * (x - x0)  # DDIM is exact Euler in the VE form
        import samplers

        def denoiser(x_, sigma_):
            return self._teacher_x0(x_, sigma_, cond, uncond, guidance)

        sigmas = torch.stack([sigma_t[0], sigma_s[0]]).double()
        return samplers.sample(self.config.solver, denoiser, x, sigmas, disable=True)

    def loss(self, batch: dict) -> torch.Tensor:
        config = self.config
        index = batch["index"]
        t = (index + 1) * self.skip - 1
        s = (t - self.skip).clamp(min=0)
        sigma_t, sigma_s = self.sigmas[t], self.sigmas[s]
        x = batch["x0"] + sigma_t.view(-1, 1, 1, 1) * batch["noise"]
        guidance_cond = None
        if config.variant == "full":
            guidance_cond = guidance_embedding(batch["guidance"], config.guidance_embed_dim).to(self.device)
        guidance = batch["guidance"].to(self.device)
        with self.accelerator.autocast():
            prediction = self._consistency(self._student_denoiser, x, sigma_t, t, batch["cond"], guidance_cond)
            with torch.no_grad():
                x_s = self.teacher_step(x, sigma_t, sigma_s, batch["cond"], batch["uncond"], guidance).float()
                target = self._consistency(self._target_denoiser, x_s, sigma_s, s, batch["cond"], guidance_cond)
        error = prediction.float() - target.float()
        if config.loss == "l2":
            return error.square().mean()
        return ((error.square() + config.huber_c**2).sqrt() - config.huber_c).mean()

    def train_step(self, batch: dict) -> float:
        """One optimizer step on `batch` (learning-rate warm-up, clipping, target EMA); the loss before it."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (self.step + 1) / config.warmup_steps)
        self.model.train()
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(trainable_parameters(self.student), config.max_grad_norm)
        self.optimizer.step()
        if self.target is not self.student:
            with torch.no_grad():
                torch._foreach_lerp_(self._averaged, self._online, 1.0 - config.target_decay)
        self.step += 1
        return loss.detach()

    # ------------------------------------------------------------------ export
    def export_student(self):
        """A copy of the target network (the EMA weights when there is a target EMA, else the student)."""
        target = self.target if self.target is not self.student else self.accelerator.unwrap_model(self.model)
        return copy.deepcopy(target).eval()

    def save(self, out_dir: str | Path) -> Path:
        """"lora": `pytorch_lora_weights.safetensors` (loads with `pipe.load_lora_weights(out_dir)`);
        "full": a `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) folder with the student UNet
        and an `LCMScheduler`."""
        from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        sdxl = takes_added_conditions(self.teacher)
        pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.config.variant == "lora":
            from peft.utils import get_peft_model_state_dict

            # only the adapter is written: read it in place rather than copying the whole UNet
            student = self.target if self.target is not self.student else self.accelerator.unwrap_model(self.model)
            layers = get_peft_model_state_dict(student, adapter_name=ADAPTER_NAME)
            metadata = student.peft_config[ADAPTER_NAME].to_dict()
            metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
            pipeline_class.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True,
                                             unet_lora_adapter_metadata=metadata)
            return out_dir / LORA_WEIGHT_NAME
        scheduler = LCMScheduler.from_config(
            self.pipe.scheduler.config,
            original_inference_steps=self.config.original_inference_steps,
            timestep_scaling=self.config.timestep_scaling,
        )
        components = {name: module for name, module in self.pipe.components.items()}
        components.update(unet=self.export_student(), scheduler=scheduler)
        options = {}
        if sdxl:  # keep the teacher's unconditional embedding (zeros or the empty prompt)
            options["force_zeros_for_empty_prompt"] = self.pipe.config.get("force_zeros_for_empty_prompt", True)
        pipeline_class(**components, **options).save_pretrained(out_dir / "pipeline", safe_serialization=True)
        return out_dir / "pipeline"


def distill_lcm(pipe, data, out_dir: str | Path, config: LCMDistillConfig | None = None, *, resume: bool = True,
                disable_progress: bool | None = None) -> dict:
    """Distil `pipe` (the teacher) on `data` (a `distill.data.CaptionedImages`) into `out_dir`.

    Resumes from `out_dir/checkpoint` when `resume` and one is there; stops at `max_steps` or after
    `time_budget` seconds; writes the student (see `LCMDistiller.save`) and `lcm_distill.json`.
    """
    from tqdm.auto import tqdm

    from accel.conditioning import encode_conditioning

    from .data import encode_latents

    config = config or LCMDistillConfig()
    out_dir = Path(out_dir)
    distiller = LCMDistiller(pipe, config)
    accelerator, device = distiller.accelerator, distiller.device
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device).eval()
    latents = encode_latents(pipe.vae, data)
    embeddings = encode_conditioning(pipe, latents.captions, resolution=tuple(data.images.shape[-2:]))

    checkpoint = out_dir / "checkpoint"
    state_path = checkpoint / "lcm_state.json"
    seconds = 0.0
    if resume and state_path.is_file():
        accelerator.load_state(str(checkpoint))
        state = json.loads(state_path.read_text())
        distiller.step, seconds = state["step"], state["seconds"]
        accelerator.print(f"resumed LCM distillation from {checkpoint} at step {distiller.step}")

    def save_checkpoint() -> None:
        accelerator.save_state(str(checkpoint))
        state_path.write_text(json.dumps({"step": distiller.step, "seconds": seconds}))

    deadline = None if config.time_budget is None else time.monotonic() + config.time_budget
    losses = []
    progress = tqdm(total=config.max_steps, initial=distiller.step, desc="lcm", disable=disable_progress or not accelerator.is_local_main_process)
    start = time.monotonic()
    while distiller.step < config.max_steps and (deadline is None or time.monotonic() < deadline):
        batch = distiller.draw_batch(latents, embeddings, distiller.step)
        losses.append(distiller.train_step(batch))
        progress.update(1)
        if distiller.step % 50 == 0:
            progress.set_postfix(loss=f"{float(losses[-1]):.5f}")
        if distiller.step % config.checkpoint_every == 0:
            seconds, start = seconds + time.monotonic() - start, time.monotonic()
            save_checkpoint()
    progress.close()
    seconds += time.monotonic() - start
    save_checkpoint()
    saved = distiller.save(out_dir)
    losses = [float(v) for v in losses]
    window = max(1, min(50, len(losses) // 4))
    summary = {
        "variant": config.variant,
        "config": {k: v for k, v in asdict(config).items()},
        "steps": distiller.step,
        "train_seconds": round(seconds, 1),
        "steps_this_run": len(losses),
        "loss_first": sum(losses[:window]) / window if losses else None,
        "loss_last": sum(losses[-window:]) / window if losses else None,
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(distiller.student)),
        "saved": str(saved),
        "skipping_interval": distiller.skip,
    }
    if any(math.isnan(v) for v in losses):
        summary["warning"] = "the loss was NaN at some step"
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
