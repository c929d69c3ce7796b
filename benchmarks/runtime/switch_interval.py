"""Why a background compile shortens Python's thread switch interval (`accel/runtime/process.py`).

Each torch op releases the GIL; with another thread running Python (as a compiling thread does), the calling
thread waits up to the switch interval to get it back, at every op. This times 200 small linear layers alone and
beside a busy Python thread, at a few intervals, each in a fresh interpreter.

    python3 benchmarks/runtime/switch_interval.py            (CPU, a few seconds)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

INTERVALS = (0.005, 0.001, 0.0002, 0.00005)


def measure(interval: float) -> tuple[float, float]:
    import torch

    sys.setswitchinterval(interval)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(range(1000))

    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(200)])
    x = torch.randn(2, 16)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        model(x)
        alone = time.perf_counter() - start
        thread = threading.Thread(target=busy, daemon=True)
        thread.start()
        start = time.perf_counter()
        model(x)
        beside = time.perf_counter() - start
    stop.set()
    thread.join()
    return alone, beside


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        alone, beside = measure(float(sys.argv[2]))
        print(f"switch interval {float(sys.argv[2]) * 1e3:g} ms: alone {alone * 1e3:.1f} ms, beside a busy thread "
              f"{beside * 1e3:.1f} ms", flush=True)
        return 0
    for interval in INTERVALS:
        subprocess.run([sys.executable, __file__, "--child", str(interval)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
