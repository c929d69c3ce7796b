"""Train the quality harness's CIFAR-10 classifier (ResNet-9, Page 2018) and save it as safetensors.

Seeded and resumable: a checkpoint (weights, optimizer, epoch) is written to ``--out/checkpoint``
after every epoch and picked up on the next start. The whole training set sits on the device as uint8;
flips and 4-pixel reflect-padded crops are drawn on the device.

    python -m apps.train_classifier --out out/classifier --epochs 40
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from accel.quality.cifar import load_cifar10
from accel.quality.classifier import CifarResNet, save_classifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with train.tar.gz / test.tar.gz")
    parser.add_argument("--synthetic", type=int, default=0, help="use N random images instead of CIFAR-10 (tests)")
    parser.add_argument("--widths", type=int, nargs=4, default=(40, 80, 160, 320))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"])
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if args.synthetic:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (args.synthetic, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (args.synthetic,), generator=generator)
        return images, labels, images, labels
    train = load_cifar10("train", args.data_dir)
    test = load_cifar10("test", args.data_dir)
    return (*train, *test)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop of a 4-pixel reflect-padded batch, in [0, 1]."""
    n = images.shape[0]
    x = images.float() / 255.0
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 9, (n,), device=x.device, generator=generator)
    base = torch.arange(32, device=x.device)
    rows = (dy[:, None] + base)[:, None, :, None].expand(n, 3, 32, 40)
    cols = (dx[:, None] + base)[:, None, None, :].expand(n, 3, 32, 32)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float() / 255.0
        correct += (model(x).argmax(1) == labels[start : start + batch_size]).sum()
    model.train()
    return float(correct) / images.shape[0]


def lr_at(step: int, total_steps: int, peak: float) -> float:
    """Triangle: linear warm-up over the first fifth, then linear decay to zero."""
    warmup = max(1, total_steps // 5)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no"))
    device = accelerator.device
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True

    train_x, train_y, test_x, test_y = (t.to(device) for t in load_data(args))
    model = CifarResNet(widths=tuple(args.widths)).to(device, memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    steps_per_epoch = math.ceil(train_x.shape[0] / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    ckpt_dir = args.out / "checkpoint"
    step = 0
    if (ckpt_dir / "state.json").is_file():
        state = json.loads((ckpt_dir / "state.json").read_text())
        step = state["step"]
        accelerator.unwrap_model(model).load_state_dict(load_file(ckpt_dir / "model.safetensors", device=str(device)))
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=device, weights_only=True))
        accelerator.print(f"resumed from {ckpt_dir} at step {step}")
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)

    start_time = time.perf_counter()
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="classifier")
    while step < total_steps:
        epoch = step // steps_per_epoch
        # One generator per epoch, seeded by (seed, epoch): a resumed run draws what an unbroken one would.
        generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(train_x.shape[0], device=device, generator=generator)
        for batch, start in enumerate(range(0, train_x.shape[0], args.batch_size)):
            if step >= total_steps:
                break
            x_all = augment(train_x[order[start : start + args.batch_size]], generator)
            if epoch * steps_per_epoch + batch < step:
                continue  # already trained on before the resume; drawn anyway to keep the generator in step
            index = order[start : start + args.batch_size]
            x = x_all.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch * args.epochs, args.lr)
            with accelerator.autocast():
                loss = F.cross_entropy(model(x), train_y[index], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            progress.update(1)
        if step % steps_per_epoch == 0 or step >= total_steps:
            progress.set_postfix(loss=f"{loss.item():.3f}", epoch=step / steps_per_epoch)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}, ckpt_dir / "model.safetensors")
            torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
            (ckpt_dir / "state.json").write_text(json.dumps({"step": step}))
    progress.close()

    raw = accelerator.unwrap_model(model)
    accuracy = test_accuracy(raw, test_x, test_y)
    result = {
        "test_accuracy": accuracy,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 2),
        "train_seconds_this_run": round(time.perf_counter() - start_time, 1),
        "num_parameters": sum(p.numel() for p in raw.parameters()),
    }
    save_classifier(raw, args.out, metadata={"training": result, "seed": args.seed})
    accelerator.print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
