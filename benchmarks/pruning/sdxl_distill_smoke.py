"""SDXL distillation on the GPU (issues 7 and 8): a BK-SDM small student learns from an SDXL teacher by knowledge
distillation (``distill.kd.distill_unet``), then an LCM-LoRA is distilled from the same teacher
(``distill.lcm.distill_lcm``), both at 1024 px (latents 128x128) under bf16 autocast with gradient checkpointing.

The pipeline has random weights built from SDXL's published configs (``apps/bench_archs.py``: UNet, VAE, CLIP ViT-L
and OpenCLIP bigG text encoders), so only seconds per step and peak memory mean anything; the point is that SDXL's
pooled text embeds and time ids flow through KD, the guided LCM teacher and the LoRA export at full size. Seconds
per step are the CUDA-synchronised intervals between the teacher's calls (one per step), the first step left out.

    source benchmarks/device_setup.sh && timeout 280 python3 benchmarks/pruning/sdxl_distill_smoke.py --out "$OUT"
    python3 benchmarks/pruning/sdxl_distill_smoke.py --smoke --out /tmp/sdxl-smoke      # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

START = time.monotonic()
CAPTIONS = ("a photo of a red car on a bridge", "a watercolor of a lighthouse at dusk")


def log(text: str) -> None:
    print(f"[sdxl-distill {time.monotonic() - START:6.1f}s] {text}", flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/sdxl-distill")))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny SDXL-shaped components: checks the script end to end")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--kd-steps", type=int, default=5, help="timed KD steps (one more runs first as warm-up)")
    p.add_argument("--lcm-steps", type=int, default=5, help="timed LCM-LoRA steps (one more runs first as warm-up)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: a temporary one, deleted)")
    return p.parse_args()


def smoke_pipeline():
    """SDXL's layout at tiny widths: two CLIP text encoders (the second with a projection), a text-time UNet."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from apps.bench_archs import CLIP_L, OPENCLIP_BIGG, SD_SCHEDULER, SD_VAE, SDXL_UNET, _tokenizer

    torch.manual_seed(0)
    small_clip = dict(intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(CLIP_L, hidden_size=16, **small_clip)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(OPENCLIP_BIGG, hidden_size=16, projection_dim=32,
                                                                       **small_clip)))
    unet = UNet2DConditionModel(**dict(SDXL_UNET, block_out_channels=(32, 32, 64), sample_size=8, cross_attention_dim=32,
                                       attention_head_dim=4, transformer_layers_per_block=(1, 2, 3),
                                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8))
    vae = AutoencoderKL(**dict(SD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1), scaling_factor=0.13025)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=unet,
                                     scheduler=DDIMScheduler(**SD_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepClock:
    """Timestamps of the teacher's calls (one per training step), synchronised with the device."""

    def __init__(self, module, device):
        self.times: list[float] = []
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def stamp(called, _args, _kwargs):
            if called is module:  # a student deep-copied from the teacher carries this hook too
                sync()
                self.times.append(time.perf_counter())

        self.handle = module.register_forward_pre_hook(stamp, with_kwargs=True)

    def close(self) -> dict:
        self.handle.remove()
        intervals = [b - a for a, b in zip(self.times, self.times[1:])]
        timed = intervals[1:] or intervals  # the first interval holds the warm-up step
        return {"seconds_per_step": statistics.median(timed) if timed else None,
                "step_seconds": [round(s, 4) for s in intervals]}


def peak_memory(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    gc.collect()  # the previous phase's accelerator, optimizer and EMA hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_kd(pipe, data, resolution, args, device, work: Path) -> dict:
    import pruning
    from accel.conditioning import encode_conditioning
    from distill.data import encode_latents
    from distill.kd import KDConfig, distill_unet

    teacher = pipe.unet
    student, _ = pruning.bk_sdm_unet(teacher, "small")
    student.float()  # trained in float32 under bf16 autocast, as the teacher runs in bf16
    latents = encode_latents(pipe.vae, data)
    conditioning = encode_conditioning(pipe, data.captions, resolution=resolution)
    config = KDConfig(max_steps=args.kd_steps + 1, batch_size=args.batch_size, warmup_steps=1, learning_rate=1e-5,
                      mixed_precision="no" if args.smoke else "bf16", gradient_checkpointing=True,
                      checkpoint_every=10**6)
    reset_peak(device)
    clock = StepClock(teacher, device)
    start = time.monotonic()
    result = distill_unet(teacher, student, latents, conditioning, pipe.scheduler.config, config, work / "kd",
                          progress=False)
    seconds = time.monotonic() - start
    timing = clock.close()
    row = {
        "teacher_params": pruning.count_parameters(teacher),
        "student_params": pruning.count_parameters(result["student"]),
        "latent_shape": list(latents.mean.shape[1:]),
        "steps": result["steps"],
        **timing,
        "peak_memory_gib": peak_memory(device),
        "wall_seconds_with_checkpoint_save": round(seconds, 1),
        "loss_step1": result["loss_history"][0],
        "feature_stages": result["feature_stages"],
    }
    del result, student
    shutil.rmtree(work / "kd", ignore_errors=True)
    return row


def run_lcm(pipe, data, args, device, work: Path) -> dict:
    from distill.lcm import LCMDistillConfig, distill_lcm

    config = LCMDistillConfig(variant="lora", lora_rank=args.lora_rank, batch_size=args.batch_size,
                              max_steps=args.lcm_steps + 1, warmup_steps=1, checkpoint_every=10**6,
                              mixed_precision="no" if args.smoke else "bf16", gradient_checkpointing=True)
    reset_peak(device)
    clock = StepClock(pipe.unet, device)
    start = time.monotonic()
    summary = distill_lcm(pipe, data, work / "lcm", config, resume=False, disable_progress=True)
    seconds = time.monotonic() - start
    timing = clock.close()
    # the saved LoRA loads into the SDXL pipeline through diffusers' own loader
    pipe.load_lora_weights(str(work / "lcm"), adapter_name="lcm_check")
    lora_tensors = sum(1 for name, _ in pipe.unet.named_parameters() if "lora_" in name)
    pipe.unload_lora_weights()
    row = {
        "steps": summary["steps"],
        **timing,
        "peak_memory_gib": peak_memory(device),
        "wall_seconds_with_checkpoint_save": round(seconds, 1),
        "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"],
        "trainable_parameters": summary["trainable_parameters"],
        "lora_file_mib": round((work / "lcm" / "pytorch_lora_weights.safetensors").stat().st_size / 2**20, 1),
        "lora_tensors_loaded": lora_tensors,
    }
    shutil.rmtree(work / "lcm", ignore_errors=True)
    return row


def main() -> None:
    from apps.bench_archs import build_pipeline
    from distill.data import CaptionedImages

    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)
        pipe, resolution = smoke_pipeline(), 64
    else:
        pipe, resolution = build_pipeline("sdxl", device="cuda", dtype=torch.bfloat16), 1024
        pipe.set_progress_bar_config(disable=True)
    log(f"built the SDXL pipeline on {device} ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M UNet params)")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(CAPTIONS), 3, resolution, resolution), dtype=torch.uint8, generator=generator)
    data = CaptionedImages(images, CAPTIONS, torch.arange(len(CAPTIONS))[:, None])

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sdxl-distill-"))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "smoke": args.smoke, "resolution": resolution, "batch_size": args.batch_size,
              "dtype": "float32" if args.smoke else "bf16 teacher, float32 student under bf16 autocast",
              "gradient_checkpointing": True}
    def write() -> None:  # after every phase, so that a run cut short still reports what it measured
        result["total_seconds"] = round(time.monotonic() - START, 1)
        (args.out / "sdxl_distill_smoke.json").write_text(json.dumps(result, indent=2) + "\n")

    try:
        result["kd_bk_small"] = run_kd(pipe, data, resolution, args, device, work)
        write()
        kd = result["kd_bk_small"]
        log(f"KD bk-small: {kd['seconds_per_step']:.3f} s/step, peak {kd['peak_memory_gib']} GiB, "
            f"{kd['student_params'] / 1e6:.0f}M of {kd['teacher_params'] / 1e6:.0f}M params")
        result["lcm_lora"] = run_lcm(pipe, data, args, device, work)
        lcm = result["lcm_lora"]
        log(f"LCM-LoRA rank {args.lora_rank}: {lcm['seconds_per_step']:.3f} s/step, peak {lcm['peak_memory_gib']} GiB, "
            f"loss {lcm['loss_first']:.4g} -> {lcm['loss_last']:.4g}, {lcm['lora_tensors_loaded']} LoRA tensors loaded")
    finally:
        write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {args.out / 'sdxl_distill_smoke.json'}")


if __name__ == "__main__":
    main()
