import os, sys, time; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import *
from samplers.tuned import tune_schedule
ncal = int(sys.argv[1]); sampler = sys.argv[2]; objective = sys.argv[3]; space = sys.argv[4]; orders = sys.argv[5] == "1"
tag = "_".join(sys.argv[1:6])
c = setup("cal", ncal)
opts = {"order": 2} if sampler.startswith("unipc") else {}
dec = (lambda y: decode(y)) if space == "image" else None
t = time.perf_counter()
tuned = tune_schedule(den, c["x_T"] / math.sqrt(1 + ns.sigma_max ** 2), ns, sampler=sampler, num_steps=5, extra_args=c["extra"],
                      init_schedule=tuple(sys.argv[6].split(",")), reference=c["ref"], objective=objective, decode=dec,
                      space=space, search_orders=orders, sampler_options=opts)
print(tag, "search s", time.perf_counter() - t, tuned, flush=True)
tuned.save(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"schedules/{tag}.json"))
d = setup("held", 100)
print(tag, "HELD", judge(d, sampler, tuned.sigmas, **opts, **({"orders": tuned.orders} if tuned.orders else {})), flush=True)
