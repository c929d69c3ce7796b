"""Issue 7 on the GPU: block-pruned UNets (BK-SDM, LAPTOP-Diff) and their recovery by knowledge distillation.

1. Speed (random weights, fp16, CFG batch 2): UNet step latency of SD1.5 (512 px) and SDXL (1024 px) against
   their BK-SDM base / small / tiny students, CUDA-synchronised medians after warm-up.
2. Quality on the embedded model: prune its UNet (bk-small; laptop at --laptop-ratio of the parameters), evaluate
   before KD, retrain each by KD for --kd-seconds, evaluate again - prompt adherence, Frechet distance and PSNR to
   the teacher (n images, 20 DPM-Solver++ steps, guidance 4), the teacher evaluated in the same run.

    python benchmarks/pruning/measure.py --out out/pruning           # the device run (see run.sh)
    python benchmarks/pruning/measure.py --smoke --out /tmp/smoke    # the whole script on CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import torch

import accel
import pruning
from accel.quality.evaluate import evaluate

START = time.monotonic()


def log(text: str) -> None:
    print(f"[pruning {time.monotonic() - START:6.1f}s] {text}", flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--kd-seconds", type=float, default=130.0, help="KD time per student")
    p.add_argument("--kd-batch", type=int, default=256)
    p.add_argument("--kd-lr", type=float, default=2e-4)
    p.add_argument("--laptop-ratio", type=float, default=0.4)
    p.add_argument("--speed-repeats", type=int, default=20)
    p.add_argument("--speed-only", action="store_true", help="only the SD1.5 / SDXL speed table")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# 1. Speed table


def speed_table(args, device) -> list[dict]:
    from diffusers import UNet2DConditionModel

    from apps.bench_archs import SD15_UNET, SDXL_UNET

    archs = {"sd15-512px": SD15_UNET, "sdxl-1024px": SDXL_UNET}
    if args.smoke:  # same block layouts, tiny widths
        small = dict(block_out_channels=(32, 32, 64, 64), sample_size=8, cross_attention_dim=32, attention_head_dim=4)
        archs = {"sd15-smoke": dict(SD15_UNET, **small),
                 "sdxl-smoke": dict(SDXL_UNET, block_out_channels=(32, 32, 64), sample_size=8, cross_attention_dim=32,
                                    attention_head_dim=4, transformer_layers_per_block=(1, 2, 3), addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=32 + 6 * 8)}
    dtype = torch.float32 if args.smoke else torch.float16
    rows = []
    for arch, config in archs.items():
        torch.manual_seed(0)
        with torch.device(device):
            teacher = UNet2DConditionModel(**config).to(dtype).eval()
            inputs = pruning.example_inputs(teacher, 2)
            base_latency = pruning.measure_latency(teacher, inputs, repeats=args.speed_repeats)
            base_params = pruning.count_parameters(teacher)
            rows.append({"arch": arch, "unet": "original", "params": base_params, "latency_s": base_latency, "speedup": 1.0})
            log(f"{arch} original: {base_params / 1e6:.1f}M params, {base_latency * 1e3:.2f} ms / step")
            for variant in pruning.BK_SDM_VARIANTS:
                student, _ = pruning.bk_sdm_unet(teacher, variant)
                latency = pruning.measure_latency(student, inputs, repeats=args.speed_repeats)
                params = pruning.count_parameters(student)
                rows.append({"arch": arch, "unet": f"bk-{variant}", "params": params, "latency_s": latency,
                             "speedup": base_latency / latency})
                log(f"{arch} bk-{variant}: {params / 1e6:.1f}M params, {latency * 1e3:.2f} ms / step, {base_latency / latency:.2f}x")
                del student
        del teacher
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Embedded model: prune, evaluate, KD, evaluate


def embedded_quality(args, device) -> dict:
    from accel.embedded import load_embedded_pipeline
    from accel.quality.cifar import load_cifar10
    from distill.data import cifar10_captioned, encode_captions, encode_latents
    from distill.kd import KDConfig, distill_unet

    pipe = load_embedded_pipeline(device, torch.float32)
    teacher = pipe.unet
    limit = 256 if args.smoke else None
    data = cifar10_captioned("test" if args.smoke else "train", limit=limit)  # smoke: the smaller archive
    latents = encode_latents(pipe.vae, data)
    with torch.no_grad():
        captions = encode_captions(pipe.text_encoder, pipe.tokenizer, data.captions)
    reference = load_cifar10("test", limit=300 if args.smoke else None)[0]
    log(f"encoded {len(data)} images (x2 mirrored) and {len(data.captions)} captions")

    # LAPTOP calibration: real latents with their captions, 8 timesteps across training.
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(latents.mean.shape[0], generator=g)[: 2 if args.smoke else 64]
    calibration = pruning.calibration_inputs(teacher, captions[latents.choices[index, 0]], pipe.scheduler.config,
                                             x0=latents.mean[index], num_timesteps=2 if args.smoke else 8)
    students = {"bk-small": pruning.bk_sdm_unet(teacher, "small")[0]}
    laptop, info = pruning.laptop_unet(teacher, calibration, args.laptop_ratio, target="params")
    log(f"LAPTOP scored {len(info['scores'])} candidates, removed {len(info['removed_blocks'])} blocks")
    students["laptop"] = laptop
    reports = {}
    for name, student in students.items():
        reports[name] = pruning.pruning_report(teacher, student, method=name, inputs=pruning.example_inputs(teacher, 2 if args.smoke else 200),
                                               removed_blocks=info["removed_blocks"] if name == "laptop" else (),
                                               repeats=3 if args.smoke else 20)
        log(f"{name}: params x{reports[name]['params_ratio']:.3f}, MACs x{reports[name]['macs_ratio']:.3f}, "
            f"latency x{reports[name]['latency_ratio']:.3f} (batch 200)")
    reports["laptop"]["scores"] = info["scores"]

    options = dict(n=20 if args.smoke else args.n, num_inference_steps=2 if args.smoke else 20, guidance_scale=4.0,
                   seed=0, batch_size=10 if args.smoke else 250, reference_images=reference)

    def swap(student):
        return accel.AccelConfig(model=accel.UNetSwapConfig(unet=student))

    evaluations, baseline = {}, None
    for name, student in students.items():
        result = evaluate(pipe, config=swap(student), return_images=baseline is None, baseline=baseline, **options)
        baseline = baseline or result
        evaluations[f"{name} before KD"] = result["accelerated"]
        log(f"{name} before KD: adherence {result['accelerated'].get('adherence')}, "
            f"Frechet {result['accelerated'].get('frechet_distance')}, PSNR {result['accelerated']['psnr_db']:.2f}")
    evaluations = {"teacher": baseline["baseline"], **evaluations}
    log(f"teacher: adherence {baseline['baseline'].get('adherence')}, Frechet {baseline['baseline'].get('frechet_distance')}")

    training = {}
    for name, student in students.items():
        config = KDConfig(max_steps=3 if args.smoke else 1500, time_budget=None if args.smoke else args.kd_seconds,
                          batch_size=8 if args.smoke else args.kd_batch, learning_rate=args.kd_lr, warmup_steps=50,
                          mixed_precision="no" if args.smoke else "bf16", checkpoint_every=10**6, seed=0)
        result = distill_unet(teacher, student, latents, captions, pipe.scheduler.config, config,
                              args.out / "work" / name, progress=False)
        students[name] = result.pop("student")
        training[name] = result
        log(f"{name} KD: {result['steps']} steps in {result['train_seconds']} s, loss {result['loss_history'][-1]}")
        after = evaluate(pipe, config=swap(students[name]), baseline=baseline, **options)["accelerated"]
        evaluations[f"{name} after KD"] = after
        log(f"{name} after KD: adherence {after.get('adherence')}, Frechet {after.get('frechet_distance')}, PSNR {after['psnr_db']:.2f}")
        pruning.save_unet(students[name].to(torch.float16), args.out / "students" / name, reports[name])
    settings = {k: v for k, v in options.items() if k != "reference_images"}
    return {"settings": settings, "real_vs_real_frechet_distance": baseline.get("real_vs_real_frechet_distance"),
            "pruning": reports, "kd": training, "evaluations": evaluations}


def markdown(result: dict) -> str:
    lines = ["# Block-pruned UNets and KD (issue 7)", "", f"Device: {result['device']}.", ""]
    if result.get("speed"):
        lines += ["## UNet step latency, random weights, fp16, CFG batch 2", "",
                  "| arch | UNet | params (M) | ms / step | speed-up |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['arch']} | {r['unet']} | {r['params'] / 1e6:.1f} | {r['latency_s'] * 1e3:.2f} | {r['speedup']:.2f}x |"
                  for r in result["speed"]]
    emb = result.get("embedded")
    if emb:
        s = emb["settings"]
        lines += ["", f"## Embedded model: {s['n']} images, {s['num_inference_steps']} DPM-Solver++ steps, guidance "
                  f"{s['guidance_scale']}", "", "| UNet | params x | MACs x | adherence | Frechet distance | PSNR to teacher (dB) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, row in emb["evaluations"].items():
            rep = emb["pruning"].get(name.split(" ")[0], {})
            fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
            lines.append(f"| {name} | {fmt(rep.get('params_ratio'), 3)} | {fmt(rep.get('macs_ratio'), 3)} | "
                         f"{fmt(row.get('adherence'), 3)} | {fmt(row.get('frechet_distance'), 2)} | {fmt(row.get('psnr_db'), 2)} |")
        for name, kd in emb["kd"].items():
            lines.append(f"\nKD {name}: {kd['steps']} steps, {kd['train_seconds']} s, batch {kd['batch_size']}.")
        lines.append(f"\nLAPTOP removed: {', '.join(emb['pruning']['laptop']['removed_blocks'])}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "smoke": args.smoke}
    try:
        result["speed"] = speed_table(args, device)
    except Exception as error:  # keep going: the quality half is measured independently
        log(f"speed table failed: {error!r}")
        result["speed_error"] = repr(error)
    (args.out / "pruning_results.json").write_text(json.dumps(result, indent=2, default=str))
    if args.speed_only:
        print(json.dumps(result.get("speed"), indent=1, default=str))
        return
    result["embedded"] = embedded_quality(args, device)
    (args.out / "pruning_results.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "pruning_results.md").write_text(markdown(result))
    with tarfile.open(args.out / "students.tar", "w") as tar:
        tar.add(args.out / "students", arcname="students")
    print(markdown(result))
    log("done")


if __name__ == "__main__":
    main()
