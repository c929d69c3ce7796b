"""Does torch's ahead-of-time compile skip what portable artifacts cannot (issue 23)? A probe for the next device run.

    source benchmarks/device_setup.sh && python3 benchmarks/runtime/aot_compile.py --arch sd15,sdxl --out $OUT/aot
    python3 benchmarks/runtime/aot_compile.py --smoke --out /tmp/aot                       # CPU, embedded UNet

With `RuntimeConfig(compile_cache=...)` a fresh process loads torch's mega-cache (`torch.compiler.save_cache_artifacts`),
which holds inductor's and AOTAutograd's output but not dynamo's trace: SDXL's first call from artifacts still took
34 s on the H200, most of it tracing (`cold_start.py`, `trace_time.py`). `torch.compile(fn, fullgraph=True)
.aot_compile(example_inputs)` (experimental) packages the traced, compiled function with its guards; a new process
loads it with `torch.compiler.load_compiled_function` and calls it without tracing. This script compares the two
on the UNet alone (random weights of `--arch`, fp16, CFG batch, the preset's channels-last; `--smoke`: the embedded
UNet in fp32 on the CPU), each case a fresh process on an empty inductor cache:

    mega-save   torch.compile of the UNet's forward: first call, then save_cache_artifacts
    mega-load   load_cache_artifacts, torch.compile, first call (what compile_cache does today)
    aot-save    aot_compile of the forward (tensor guards only: `keep_tensor_guards_unsafe`), saved
    aot-load    load_compiled_function, first call

and for the loads the steady median of 10 calls and the largest difference to the eager output. `--warm`: each load
runs on its save's inductor cache instead (on a CPU, where neither file holds built C++ kernels, this leaves dynamo's
trace as the difference between the two). Writes
aot_compile.json and aot_compile.md to --out after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_time import REPO, fresh_process  # noqa: E402

CASES = ("mega-save", "mega-load", "aot-save", "aot-load")


def denoiser_forward(module, *args, **kwargs):
    """The function aot_compile packages: a module-level function pickles by name, where diffusers' decorated
    `forward` does not (its qualified name resolves to the decorator's wrapper)."""
    return module.forward(*args, **kwargs)


def unet_call(unet, side: int, device, dtype) -> tuple[tuple, dict]:
    """The arguments of one CFG-batch call of `unet` on a `side` x `side` latent (SDXL's added conditions where its
    config asks for them)."""
    import torch

    args = (torch.randn(2, unet.config.in_channels, side, side, device=device, dtype=dtype),
            torch.tensor(500.0, device=device),
            torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype))
    kwargs = {"return_dict": False}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
                                       "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}
    return args, kwargs


def _inputs(arch: str, smoke: bool):
    import torch

    from apps.bench_archs import build_pipeline

    if smoke:
        torch.set_num_threads(2)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    pipe = build_pipeline("embedded" if smoke else arch, device=device, dtype=dtype)
    unet = pipe.unet.eval()
    if not smoke:
        unet.to(memory_format=torch.channels_last)
    side = unet.config.sample_size if smoke else {"sd15": 64, "sdxl": 128}[arch]
    return (unet, *unet_call(unet, side, device, dtype))


def child(case: str, arch: str, smoke: bool, folder: Path) -> dict:
    import torch

    # `.aot_compile` and `load_compiled_function` are behind this switch, off by default in torch 2.11 (the device's),
    # on in 2.13: without it the compiled function simply has no `aot_compile` attribute.
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        torch._dynamo.config.enable_aot_compile = True
    unet, args, kwargs = _inputs(arch, smoke)
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    record = {"case": case, "arch": "embedded" if smoke else arch, "torch": torch.__version__}
    with torch.no_grad():
        reference = unet(*args, **kwargs)[0].float()
        sync()
        path = folder / f"{record['arch']}-{case.split('-')[0]}.bin"
        start = time.perf_counter()
        if case == "mega-save" or case == "mega-load":
            if case == "mega-load":
                torch.compiler.load_cache_artifacts(path.read_bytes())
                record["load_s"] = time.perf_counter() - start
            fn = torch.compile(unet.forward)
            call = lambda: fn(*args, **kwargs)  # noqa: E731
        elif case == "aot-save":
            compiled = torch.compile(denoiser_forward, fullgraph=True, options={
                "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}).aot_compile(((unet, *args), kwargs))
            record["aot_compile_s"] = time.perf_counter() - start
            call = lambda: compiled(unet, *args, **kwargs)  # noqa: E731
        else:
            with open(path, "rb") as f:
                compiled = torch.compiler.load_compiled_function(f)
            record["load_s"] = time.perf_counter() - start
            call = lambda: compiled(unet, *args, **kwargs)  # noqa: E731
        out = call()[0]
        sync()
        record["first_call_s"] = time.perf_counter() - start  # from the start of the case, load included
        record["max_abs_diff"] = float((out.float() - reference).abs().max())
        if case == "mega-save":
            path.write_bytes(torch.compiler.save_cache_artifacts()[0])
        elif case == "aot-save":
            compiled.save_compiled_function(str(path))
        if case.endswith("save"):
            record["file_mb"] = path.stat().st_size / 1e6
        else:
            times = []
            for _ in range(10):
                began = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - began)
            record["steady_ms"] = statistics.median(times) * 1e3
    return record


def write_report(out: Path, records: list[dict], meta: dict) -> None:
    (out / "aot_compile.json").write_text(json.dumps({**meta, "records": records}, indent=1))

    def cell(record, key, scale=1.0, digits=1):
        value = record.get(key)
        return "-" if value is None else f"{value * scale:.{digits}f}"

    rows = ["| arch | case | warm cache | load s | compile s | first call s (load included) | steady ms | max diff to eager | file MB |",
            "| --- " * 9 + "|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['arch']} | {r['case']} | {(r['error'].strip().splitlines() or ['failed'])[-1][:200]} |"
                        + " |" * 6)
            continue
        rows.append(f"| {r['arch']} | {r['case']} | {'yes' if r.get('warm_cache') else 'no'} | {cell(r, 'load_s', digits=2)} | {cell(r, 'aot_compile_s')} | "
                    f"{cell(r, 'first_call_s', digits=2)} | {cell(r, 'steady_ms', digits=2)} | "
                    f"{r['max_abs_diff']:.2e} | {cell(r, 'file_mb')} |")
    (out / "aot_compile.md").write_text("\n".join([
        f"# Ahead-of-time compile against portable artifacts ({meta['mode']})", "", f"`{meta['command']}`", "",
        "The UNet alone; each case a fresh process, on an empty inductor cache unless `warm_cache` (--warm: a load on "
        "its save's cache).", "", *rows, ""]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15", help="sd15, sdxl or both comma-separated")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--timeout", type=float, default=300, help="seconds for each case's process")
    parser.add_argument("--warm", action="store_true", help="each load on its save's inductor cache")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", default=None, choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print("RECORD " + json.dumps(child(args.child, args.arch, args.smoke, Path(args.folder))), flush=True)
        return 0
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="accel-aot-"))  # the saved files, kept out of --out
    meta = {"command": shlex.join(["python3", *sys.argv]), "mode": "smoke, CPU" if args.smoke else "GPU",
            "torch": torch.__version__}
    records, caches = [], {}
    for arch in (["embedded"] if args.smoke else args.arch.split(",")):
        for case in args.cases.split(","):
            began = time.perf_counter()
            child_args = ["--child", case, "--arch", arch, "--folder", str(folder)] + (["--smoke"] if args.smoke else [])
            kind = (arch, case.split("-")[0])
            cache = caches[kind] if args.warm and case.endswith("load") and kind in caches else \
                tempfile.mkdtemp(prefix=f"inductor-{case}-")
            caches.setdefault(kind, cache)
            record = {"case": case, "arch": arch, "warm_cache": cache == caches.get(kind) and case.endswith("load"),
                      **fresh_process(__file__, child_args, cache, args.timeout)}
            record["wall_s"] = time.perf_counter() - began
            records.append(record)
            write_report(out, records, meta)
            print(f"{arch} {case}: " + (record["error"][-300:] if "error" in record else json.dumps(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()})), flush=True)
    print(f"wrote {out / 'aot_compile.json'}, {out / 'aot_compile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
