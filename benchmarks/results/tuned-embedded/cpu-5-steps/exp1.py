import os, sys, json; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import *
d = setup("held", 100)
default5 = get_sigmas("default", 5, ns, timestep_spacing="linspace", steps_offset=1)
print("default sigmas", default5.tolist())
tuned = json.load(open("accel/models/mini-sd-cifar10/tuned_schedules/dpmpp_2m-5.json"))["sigmas"]
print("2m default", judge(d, "dpmpp_2m", default5), flush=True)
print("2m shipped tuned", judge(d, "dpmpp_2m", tuned), flush=True)
print("unipc default", judge(d, "unipc_bh2", default5, order=2), flush=True)
end = default5.clone(); end[-1] = ns.sigma_min
print("2m default end sigma_min lof=False", judge(d, "dpmpp_2m", end, lower_order_final=False), flush=True)
print("unipc default end sigma_min lof=False", judge(d, "unipc_bh2", end, order=2, lower_order_final=False), flush=True)
