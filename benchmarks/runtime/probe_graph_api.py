import inspect, torch, os
print("torch", torch.__version__, "cuda", torch.version.cuda)
print([n for n in dir(torch.cuda.CUDAGraph) if not n.startswith("__")])
print([n for n in dir(torch._C._CUDAGraph) if not n.startswith("__")])
try:
    import torch._higher_order_ops.cudagraph_conditional_nodes as m
    print(inspect.getsource(m)[:6000])
except Exception as e:
    print("no module", e)
