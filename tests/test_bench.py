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
