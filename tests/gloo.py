"""CPU multi-process test cases: forked workers on a gloo process group, each saving its results for the test."""

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import accel


def _worker(rank: int, cases, world: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        out = cases(rank, world, tmp)
    finally:
        dist.destroy_process_group()
    np.savez(tmp / f"rank{rank}.npz", **out)


def spawn(cases, world: int, tmp: Path, timeout: float = 150.0) -> list[dict]:
    """Run `cases(rank, world, tmp) -> dict of arrays` on `world` gloo processes; every rank's dict, in rank order."""
    # fork: the workers reuse this process's imports instead of importing torch and diffusers again.
    context = mp.start_processes(_worker, args=(cases, world, tmp), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo workers did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(world)]


def error_text(fn) -> str:
    """The error `fn()` raises, as "Type: message" a worker can save ("" when it raises none)."""
    try:
        fn()
    except (ValueError, RuntimeError, accel.UnsupportedPipelineError) as err:
        return f"{type(err).__name__}: {err}"
    return ""
