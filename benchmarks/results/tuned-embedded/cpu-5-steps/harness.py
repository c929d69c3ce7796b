"""Scratch harness: held-out judge (pure-function path) with cached references."""
import math, os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../.."))
from accel.embedded import load_embedded_pipeline, CIFAR10_CLASSES
from accel.quality.evaluate import cifar_prompts
from samplers.api import sample
from samplers.denoiser import UNetDenoiser
from samplers.schedules import get_sigmas
from samplers.tuned import CFGDenoiser

CACHE = os.environ.get("TUNED_CPU_CACHE", "/tmp/tuned-cpu-cache"); os.makedirs(CACHE, exist_ok=True)
pipe = load_embedded_pipeline(device="cpu")
base = UNetDenoiser(pipe.unet, pipe.scheduler)
ns = base.schedule
den = CFGDenoiser(base, 4.0)

def setup(kind, n):
    path = f"{CACHE}/{kind}{n}.pt"
    if os.path.exists(path):
        return torch.load(path)
    if kind == "held":
        prompts, _ = cifar_prompts(n)
        noise = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(i)) for i in range(n)])
    else:
        prompts = [f"a picture of a {CIFAR10_CLASSES[i % 10]}" for i in range(n)]
        noise = torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(10000))
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * n)
    extra = {"cond": {"encoder_hidden_states": pe}, "uncond": {"encoder_hidden_states": ne}}
    x_T = noise.double().float() * math.sqrt(1 + ns.sigma_max ** 2)
    t = time.perf_counter()
    with torch.no_grad():
        ref = sample("dpmpp_3m", den, x_T, get_sigmas("karras", 50, ns), extra_args=extra, disable=True)
    print(kind, "reference s", time.perf_counter() - t, flush=True)
    d = {"extra": extra, "x_T": x_T, "ref": ref, "ref_img": decode(ref)}
    torch.save(d, path)
    return d

def decode(x_ve, sigma_end=0.0):
    x = x_ve / math.sqrt(1 + sigma_end ** 2)
    with torch.no_grad():
        img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return ((img / 2 + 0.5).clamp(0, 1) * 255).round() / 255

def judge(d, sampler, sigmas, **options):
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    with torch.no_grad():
        out = sample(sampler, den, d["x_T"], sigmas, extra_args=d["extra"], disable=True, **options)
    img = decode(out, float(sigmas[-1]))
    mse = (img.double() - d["ref_img"].double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())
