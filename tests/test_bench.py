"""The benchmark harness end to end on CPU with a tiny pipeline (logic only; timings are not asserted)."""

import json

import pytest
from tiny import tiny_sd_pipeline

from apps import bench, bench_archs


def test_bench_runs_configs_and_writes_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_archs, "build_pipeline", lambda arch, **kw: tiny_sd_pipeline(tmp_path))
    monkeypatch.setitem(bench_archs.DEFAULT_SIZE, "sd15", 32)
    report = bench.run_benchmark("sd15", ["stock", "graph", "quality"], steps=2, scheduler="ddim", runs=1, warmup=1)
    rows = {r["config"]: r for r in report["results"]}
    assert rows["stock"]["speedup"] == 1.0
    assert rows["graph"]["psnr_db"] == float("inf")  # eager fallback on CPU: identical to stock
    assert rows["quality"]["steps"] == 30 and rows["quality"]["psnr_db"] < 100
    paths = bench.write_report(report, tmp_path / "out" / "r")
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert [r["config"] for r in data["results"]] == ["stock", "graph", "quality"]
    assert "| graph | 2 |" in (tmp_path / "out" / "r.md").read_text()
    assert len(paths) >= 2


def test_bench_rejects_unknown_config():
    with pytest.raises(SystemExit, match="valid: stock"):
        bench.run_benchmark("sd15", ["stock", "warp"], steps=2, scheduler="ddim")


def test_bench_without_a_gpu_says_so(monkeypatch):
    import torch

    from apps.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="measures on a CUDA GPU"):
        main(["bench", "--arch", "embedded", "--configs", "stock", "--runs", "1"])


def test_bench_interleave_alternates_the_order_and_pairs_every_config(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(bench_archs, "build_pipeline", lambda arch, **kw: tiny_sd_pipeline(tmp_path))
    order = []

    def apply(pipe, config):
        order.append("stock" if config is None else "graph" if "cuda_graph=True" in repr(config) else "deepcache")
        return lambda: None

    seconds = {"stock": 1.0, "deepcache": 0.5, "graph": 0.25}  # every round slower than the last: a drifting host

    def time_pipeline(pipe, args, *, runs, warmup, seed):
        return {"first_call_s": 0.0, "times_s": [seconds[order[-1]] * len(order)], "peak_mem_gib": None,
                "images": [np.zeros((8, 8, 3), np.uint8)]}

    monkeypatch.setattr(bench, "_apply", apply)
    monkeypatch.setattr(bench, "time_pipeline", time_pipeline)
    report = bench.run_benchmark("sd15", ["stock", "deepcache", "graph"], steps=2, scheduler="ddim", size=32, runs=4,
                                 interleave=True)
    assert order == ["stock", "deepcache", "graph", "graph", "deepcache", "stock"] * 2
    rows = {r["config"]: r for r in report["results"]}
    assert rows["graph"]["paired"]["deepcache"]["rounds_faster"] == 4
    assert rows["deepcache"]["paired"]["graph"]["rounds_faster"] == 0
    # graph's time over deepcache's per round: 0.75, 0.4, 0.5625, 0.4545...; their median is the notes' ratio.
    assert "Paired per round: deepcache 0.509x over graph, faster in 0 of 4 rounds" in bench.markdown_table(report)
