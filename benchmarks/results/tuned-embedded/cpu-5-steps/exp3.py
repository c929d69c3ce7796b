import os, sys, json; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import *
d = setup("held", 100)
default5 = get_sigmas("default", 5, ns, timestep_spacing="linspace", steps_offset=1)
tuned = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedules/dpmpp_2m-5-psnr-image-cal16.json")))["sigmas"]
print("2m heun default", judge(d, "dpmpp_2m", default5, solver_type="heun"), flush=True)
print("2m heun on tuned", judge(d, "dpmpp_2m", tuned, solver_type="heun"), flush=True)
print("unipc on 2m tuned", judge(d, "unipc_bh2", tuned, order=2), flush=True)
