"""OLSS at 5 steps on CPU: fitted coefficients on the default sigmas (history 1, 2, 3, all; ridge),
on the shipped tuned dpmpp_2m sigmas, and a joint search (each sigma candidate refitted), judged
on the 100 held-out prompts.  Usage: exp4.py [fits|joint] [ncal]"""
import os, sys, json, time; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import *
from samplers.olss import ReferenceTrajectory, fit_olss_coefficients
from samplers.tuned import tune_schedule
HERE = os.path.dirname(os.path.abspath(__file__))
what = sys.argv[1] if len(sys.argv) > 1 else "fits"
ncal = int(sys.argv[2]) if len(sys.argv) > 2 else 16


def calibration(n):
    """The calibration prompts of exp2.py with the whole 50-step reference trajectory."""
    path = f"{CACHE}/cal{n}-trajectory.pt"
    if os.path.exists(path):  # this script's own cache
        return torch.load(path, weights_only=False)
    prompts = [f"a picture of a {CIFAR10_CLASSES[i % 10]}" for i in range(n)]
    noise = torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(10000))
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * n)
        extra = {"cond": {"encoder_hidden_states": pe}, "uncond": {"encoder_hidden_states": ne}}
        x_T = noise * math.sqrt(1 + ns.sigma_max ** 2)
        t = time.perf_counter()
        ref = ReferenceTrajectory.solve(den, x_T, get_sigmas("karras", 50, ns), sampler="dpmpp_3m", extra_args=extra)
    print("calibration trajectory s", round(time.perf_counter() - t, 1), flush=True)
    c = {"extra": extra, "x_T": x_T, "ref": ref}
    torch.save(c, path)
    return c


c = calibration(ncal)
if what == "cal":
    sys.exit(0)


def held():
    for _ in range(360):  # another process may be solving the held-out reference: wait for its cache
        if os.path.exists(f"{CACHE}/held100.pt"):
            break
        time.sleep(10)
    return setup("held", 100)


default5 = get_sigmas("default", 5, ns, timestep_spacing="linspace", steps_offset=1)
shipped = json.load(open("accel/models/mini-sd-cifar10/tuned_schedules/dpmpp_2m-5.json"))["sigmas"]


def fit(sigmas, **kw):
    t = time.perf_counter()
    with torch.no_grad():
        f = fit_olss_coefficients(den, c["x_T"], torch.tensor(sigmas, dtype=torch.float64), c["ref"],
                                  extra_args=c["extra"], **kw)
    mse = (decode(f.sample) - decode(c["ref"].final)).double().square().flatten(1).mean(1)
    cal = float((10 * torch.log10(1 / mse)).mean())
    return f.coefficients, cal, time.perf_counter() - t


if what == "fits":
    d = held()
    print("2m default held", judge(d, "dpmpp_2m", default5), "| 2m shipped tuned held", judge(d, "dpmpp_2m", shipped),
          flush=True)
    for name, sig in (("default", default5.tolist()), ("shipped-tuned", shipped)):
        for history in (1, 2, 3, None):
            for ridge in ((0.0, 1e-3, 1e-2) if history == 2 else (0.0,)):
                rows, cal, sec = fit(sig, history=history, ridge=ridge)
                held = judge(d, "olss", sig, coefficients=rows)
                print(f"{name} history={history} ridge={ridge}: cal {cal:.2f} dB, held {held:.2f} dB, fit {sec:.1f} s",
                      json.dumps([[round(v, 4) for v in r] for r in rows]), flush=True)
else:
    history = None if sys.argv[3] == "all" else int(sys.argv[3]) if len(sys.argv) > 3 else 2
    init = sys.argv[4] if len(sys.argv) > 4 else "default"
    t = time.perf_counter()
    tuned = tune_schedule(den, c["x_T"] / math.sqrt(1 + ns.sigma_max ** 2), ns, sampler="olss", num_steps=5,
                          extra_args=c["extra"], reference=c["ref"], objective="psnr", decode=decode, space="image",
                          history=history, init_schedule=init if init != "shipped" else "default",
                          init_sigmas=shipped if init == "shipped" else None)
    print("joint search s", round(time.perf_counter() - t, 1), "evaluations", tuned.search_evaluations,
          "calls", tuned.search_denoiser_calls, "loss", tuned.loss_init, "->", tuned.loss_tuned, flush=True)
    d = held()
    tag = f"olss-5-joint-h{sys.argv[3] if len(sys.argv) > 3 else 2}-{init}-cal{ncal}"
    tuned.save(os.path.join(HERE, f"schedules/{tag}.json"))
    print(tag, "sigmas", [round(s, 4) for s in tuned.sigmas], "HELD",
          judge(d, "olss", tuned.sigmas, coefficients=tuned.coefficients), flush=True)
