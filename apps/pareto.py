"""The speed-vs-quality trade-off space: measured points from the benchmark JSON, and their Pareto front.

Reads what `accel bench` (`{"meta", "results"}`) and the quality harness (`{"meta", "rows"}`, and
`accel eval`'s `eval.json` with an `"accelerated"` entry) write under `benchmarks/results/`: every row
with a speed-up and a PSNR to its own baseline becomes one point. A point is on the Pareto front of its
measurement set when no other config of that set is at least as fast and at least as faithful, and
strictly better in one of the two.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path

# Identical outputs have infinite PSNR (stored as null by `accel bench`); they are drawn at this cap,
# as in the benchmark plots.
PSNR_CAP_DB = 60.0
LIVE_SERIES = "this run"
EARLIER_SERIES = "earlier runs (this session)"


@dataclass(frozen=True)
class Point:
    series: str  # one measurement set: one results file (one model, device and baseline)
    config: str
    speedup: float
    psnr_db: float  # capped at PSNR_CAP_DB
    identical: bool = False
    ssim: float | None = None
    on_front: bool = False


def default_results_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _psnr(row: dict) -> tuple[float, bool] | None:
    value = row.get("psnr_db")
    if value is None:
        # `accel bench` writes inf as null; it computes SSIM for every row, 1.0 for identical output.
        if row.get("ssim") == 1.0:
            return PSNR_CAP_DB, True
        return None
    value = float(value)
    if math.isinf(value) and value > 0:
        return PSNR_CAP_DB, True
    if math.isnan(value):
        return None
    return min(value, PSNR_CAP_DB), False


def _series_name(path: Path, root: Path, meta: dict) -> str:
    relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    # a results folder names its set ("embedded-quality/quality.json"); a lone file by its stem
    name = relative.parent.as_posix() if relative.parent != Path(".") else relative.stem
    device = str(meta.get("device") or "").replace("NVIDIA ", "").split(" ")[0]  # "H100", "cpu"
    return f"{name} ({device})" if device else name


def _rows(data: dict) -> tuple[dict, list[dict]]:
    if isinstance(data.get("results"), list):
        return data.get("meta") or {}, data["results"]
    if isinstance(data.get("rows"), list):
        return data.get("meta") or {}, data["rows"]
    if isinstance(data.get("accelerated"), dict):  # accel eval's eval.json: one accelerated run
        row = dict(data["accelerated"], config=data.get("preset") or data.get("config") or "accelerated")
        return data, [row]
    return {}, []


def load_points(results_dir: str | Path | None = None) -> list[Point]:
    """Every (speed-up, PSNR) row of the JSON files under `results_dir`, with the front marked.

    Files that are not results (other JSON, unreadable files) are skipped; rows without a speed-up
    or a PSNR to their baseline (sampler sweeps against a reference solution) are left out.
    """
    root = Path(results_dir) if results_dir is not None else default_results_dir()
    points: list[Point] = []
    if not root.is_dir():
        return points
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        meta, rows = _rows(data)
        series = _series_name(path, root, meta)
        for row in rows:
            if not isinstance(row, dict):
                continue
            config = str(row.get("config") or row.get("label") or "?")
            speedup, psnr = row.get("speedup"), _psnr(row)
            if speedup is None and psnr is None and config.startswith("baseline"):
                # The quality harness's baseline row: the reference of its set, at speed-up 1.
                speedup, psnr = 1.0, (PSNR_CAP_DB, True)
            if not isinstance(speedup, (int, float)) or psnr is None:
                continue
            ssim = row.get("ssim") if isinstance(row.get("ssim"), (int, float)) else (1.0 if psnr[1] else None)
            points.append(Point(series, config, float(speedup), psnr[0], psnr[1], ssim))
    return mark_front(points)


def mark_front(points: list[Point]) -> list[Point]:
    """The same points with `on_front` set within each series."""
    marked = []
    for p in points:
        dominated = any(
            q.series == p.series and q.speedup >= p.speedup and q.psnr_db >= p.psnr_db
            and (q.speedup > p.speedup or q.psnr_db > p.psnr_db)
            for q in points
        )
        marked.append(Point(**{**asdict(p), "on_front": not dominated}))
    return marked


def live_point(config: str, speedup: float, psnr_db: float, ssim: float | None, device: str, *, latest: bool = True) -> Point:
    """A run made in the app, as a point of its own series."""
    identical = math.isinf(psnr_db) and psnr_db > 0
    series = live_series(device)[0 if latest else 1]
    return Point(series, config, float(speedup), PSNR_CAP_DB if identical else min(float(psnr_db), PSNR_CAP_DB), identical, ssim)


# Tableau 20 without its reds and greys (those mark this app's runs): 16 colours told apart at a glance.
_PALETTE = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#9467bd", "#c5b0d5",
            "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")
LIVE_COLOR, EARLIER_COLOR = "#d62728", "#222222"


def _set_color(i: int) -> str:
    """The colour of the i-th measured set: the palette, then hues spread by the golden angle, so no two sets share one."""
    if i < len(_PALETTE):
        return _PALETTE[i]
    k = i - len(_PALETTE)
    hue = (0.08 + k * 0.381966) % 1.0
    lightness = (0.35, 0.55, 0.45)[k % 3]
    r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.9 - 0.1 * ((k // 3) % 5))
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))


def color_map(points: list[Point], device: str) -> dict[str, str]:
    """One colour per measured set, none repeated, and red / black for this app's latest / earlier runs on `device`."""
    latest, earlier = live_series(device)
    measured = sorted({p.series for p in points} - {latest, earlier})
    colors = {series: _set_color(i) for i, series in enumerate(measured)}
    colors[latest], colors[earlier] = LIVE_COLOR, EARLIER_COLOR
    return colors


def legend_html(points: list[Point], device: str) -> str:
    """The plot's legend as HTML that wraps under the plot: this app's runs first, then each measured set.

    Gradio's plot lays its legend out in one row, which runs past the right edge once there are more than a
    few sets; the plot is drawn without it and this legend sits below.
    """
    colors = color_map(points, device)
    order = [*live_series(device), *sorted(set(colors) - set(live_series(device)))]
    items = "".join(
        f'<span class="legend-item" style="display:inline-block;margin:0 14px 4px 0;white-space:nowrap">'
        f'<span style="display:inline-block;width:11px;height:11px;border-radius:50%;margin-right:5px;'
        f'vertical-align:middle;background:{colors[name]}"></span>{escape(name)}</span>'
        for name in order)
    return f'<div class="pareto-legend" style="line-height:1.6">{items}</div>'


def live_series(device: str) -> tuple[str, str]:
    """The series names of this app's latest run and of its earlier runs on `device`."""
    return f"{LIVE_SERIES} ({device})", f"{EARLIER_SERIES} ({device})"


def frame(points: list[Point], series: tuple[str, ...] = ()):
    """The points as a pandas DataFrame (columns of `Point`), for `gr.ScatterPlot`.

    Every name in `series` without a point gets a row without coordinates, which the plot does not
    draw: the plot's colour scale then holds the live series before their first point arrives.
    """
    import pandas as pd

    rows = [asdict(p) for p in points]
    present = {p.series for p in points}
    rows += [dict(series=name, config="", speedup=math.nan, psnr_db=math.nan, identical=False, ssim=None, on_front=False)
             for name in series if name not in present]
    return pd.DataFrame(rows, columns=list(Point.__dataclass_fields__))


def front_table(points: list[Point]) -> list[list]:
    """Rows (series, config, speed-up, PSNR) of the points on a front, fastest first in each series."""
    front = sorted((p for p in points if p.on_front), key=lambda p: (p.series, -p.speedup))
    return [[p.series, p.config, round(p.speedup, 2), "identical" if p.identical else round(p.psnr_db, 1)] for p in front]
