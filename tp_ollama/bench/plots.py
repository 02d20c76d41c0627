"""PNG charts of a bench report (matplotlib, imported only when a chart is drawn).

Each chart is drawn when the results hold what it shows: throughput and latency against concurrency (serve),
decode and prompt throughput per result (decode, compare), collective latency against message size
(collectives), and the cost model's prediction against the measurement.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tp_ollama.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Result = dict[str, Any]


def plot_report(report: dict[str, Any], stem: Path) -> list[Path]:
    """Write `<stem>-<chart>.png` for each chart the results allow; returns the paths written."""
    charts: list[tuple[str, Callable[[list[Result]], Figure | None]]] = [
        ("throughput", _throughput),
        ("latency", _latency),
        ("decode", _decode),
        ("collectives", _collectives),
        ("prediction", _prediction),
    ]
    written = []
    for name, draw in charts:
        figure = draw(report["results"])
        if figure is None:
            continue
        figure.suptitle(f"{figure.get_suptitle()} ({report['kind']}, {report['date']})", fontsize="medium")
        path = stem.with_name(f"{stem.name}-{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        written.append(path)
    return written


def _new_figure(title: str, panels: int = 1, height: float = 4.5) -> tuple[Figure, list[Axes]]:
    # A bare Figure (no pyplot): no global backend switch, no registry of open figures to leak; savefig
    # renders with Agg, so no display is needed.
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ConfigError("bench plots need matplotlib, which is not installed: pip install matplotlib") from error
    figure = Figure(figsize=(6.4 * panels, height), layout="constrained")
    figure.suptitle(title)
    return figure, list(figure.subplots(1, panels, squeeze=False)[0])


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _p(result: Result, metric: str, key: str) -> float | None:
    summary = result.get(metric)
    return _number(summary.get(key)) if isinstance(summary, dict) else None


def _varying(results: list[Result], exclude: tuple[str, ...] = ()) -> list[str]:
    """Config keys whose values differ between the results: what tells results of one target apart."""
    keys = dict.fromkeys(key for result in results for key in result["config"] if key not in exclude)
    return [key for key in keys if len({json.dumps(r["config"].get(key), sort_keys=True) for r in results}) > 1]


def _label(result: Result, keys: list[str]) -> str:
    values = [f"{key}={result['config'][key]}" for key in keys if key in result["config"]]
    return " ".join([result["target"], *values])


def _series(
    results: list[Result], x_key: str, y: Callable[[Result], float | None], always: tuple[str, ...] = ()
) -> dict[str, list[tuple[float, float]]]:
    """{line label: [(x, y)...] sorted by x} over results with a positive numeric config[x_key] and a y; a line
    per target and config values that differ (and the keys in `always`)."""
    points = [(r, _number(r["config"].get(x_key)), y(r)) for r in results]
    kept = [(r, x, v) for r, x, v in points if x is not None and x > 0 and v is not None]
    keys = [*always, *_varying([r for r, _, _ in kept], exclude=(x_key, *always))]
    lines: dict[str, list[tuple[float, float]]] = {}
    for result, x, value in kept:
        lines.setdefault(_label(result, keys), []).append((x, value))
    return {label: sorted(xy) for label, xy in lines.items()}


def _size(n: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def _log2_x(axes: Axes, lines: dict[str, list[tuple[float, float]]], label: Callable[[float], str]) -> None:
    """A log2 x axis ticked at the values measured, written as numbers (`64 KiB`, `8`) rather than 2^n."""
    ticks = sorted({x for xy in lines.values() for x, _ in xy})
    axes.set_xscale("log", base=2)
    axes.set_xticks(ticks, [label(x) for x in ticks])
    axes.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)


def _throughput(results: list[Result]) -> Figure | None:
    lines = _series(results, "concurrency", lambda r: _number(r.get("aggregate_tok_s")))
    if not lines:
        return None
    figure, (axes,) = _new_figure("Aggregate throughput")
    for label, xy in lines.items():
        axes.plot(*zip(*xy, strict=True), marker="o", label=label)
    _log2_x(axes, lines, "{:g}".format)
    axes.set(xlabel="concurrent requests", ylabel="generated tokens / s (all requests)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def _latency(results: list[Result]) -> Figure | None:
    panels = [(metric, title) for metric, title in (("ttft_s", "Time to first token"), ("itl_s", "Inter-token latency"))
              if _quantile_lines(results, metric, "p50")]  # fmt: skip
    if not panels:
        return None
    figure, axes_list = _new_figure("Latency (p50 solid, p99 dashed)", panels=len(panels))
    for axes, (metric, title) in zip(axes_list, panels, strict=True):
        colors: dict[str, str] = {}  # one color per line label, shared by its p50 and p99
        drawn: dict[str, list[tuple[float, float]]] = {}
        for quantile, style in (("p50", "-"), ("p99", "--")):
            for label, xy in _quantile_lines(results, metric, quantile).items():
                color = colors.setdefault(label, f"C{len(colors) % 10}")
                axes.plot(*zip(*xy, strict=True), style, marker="o", color=color, label=f"{label} {quantile}")
                drawn[f"{label} {quantile}"] = xy
        _log2_x(axes, drawn, "{:g}".format)
        axes.set(title=title, xlabel="concurrent requests", ylabel="ms")
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def _quantile_lines(results: list[Result], metric: str, quantile: str) -> dict[str, list[tuple[float, float]]]:
    """One quantile of a latency Summary in seconds, as milliseconds against concurrency."""

    def milliseconds(result: Result) -> float | None:
        seconds = _p(result, metric, quantile)
        return None if seconds is None else seconds * 1e3

    return _series(results, "concurrency", milliseconds)


def _decode(results: list[Result]) -> Figure | None:
    panels = [(metric, xlabel) for metric, xlabel in (("decode_tok_s", "decode tokens / s"),
                                                      ("prompt_tok_s", "prompt tokens / s"))
              if any(_number(r.get(metric)) is not None for r in results)]  # fmt: skip
    if not panels:
        return None
    shown = [r for r in results if any(_number(r.get(metric)) is not None for metric, _ in panels)]
    keys = _varying(shown)
    labels = [_label(r, keys) for r in shown]
    figure, axes_list = _new_figure("Throughput per result", panels=len(panels), height=1.5 + 0.4 * len(shown))
    for axes, (metric, xlabel) in zip(axes_list, panels, strict=True):
        values = [_number(r.get(metric)) or 0.0 for r in shown]
        bars = axes.barh(range(len(shown)), values, color=[f"C{i % 10}" for i in range(len(shown))])
        axes.bar_label(bars, fmt="%.1f", padding=2, fontsize="small")
        axes.set_yticks(range(len(shown)), labels)
        axes.invert_yaxis()  # first result on top, as in the table
        axes.set(xlabel=xlabel)
        axes.grid(True, axis="x", alpha=0.3)
    return figure


def _collectives(results: list[Result]) -> Figure | None:
    # One line per target and op (and whatever else differs: ranks, say); op named even when only one was run.
    with_op = [r for r in results if "op" in r["config"]]
    lines = _series(with_op, "bytes", lambda r: _p(r, "latency_us", "p50"), always=("op",))
    if not lines:
        return None
    figure, (axes,) = _new_figure("Collective latency")
    for label, xy in lines.items():
        axes.plot(*zip(*xy, strict=True), marker="o", label=label)
    _log2_x(axes, lines, _size)
    axes.set_yscale("log")
    _plain_log_y(axes)
    axes.set(xlabel="message size, bytes", ylabel="latency p50, µs")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def _plain_log_y(axes: Axes) -> None:
    # `300` rather than `3 x 10^2`; LogFormatter still thins the minor labels out over many decades.
    from matplotlib.ticker import LogFormatter

    axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _prediction(results: list[Result]) -> Figure | None:
    points = [(r, _number(r.get("predicted_ms_per_token")), _number(r.get("measured_ms_per_token"))) for r in results]
    kept = [(r, p, m) for r, p, m in points if p is not None and m is not None]
    if not kept:
        return None
    figure, (axes,) = _new_figure("Cost model: predicted vs measured")
    top = max(max(p, m) for _, p, m in kept) * 1.15 or 1.0
    axes.fill_between([0, top], [0, 0.8 * top], [0, 1.2 * top], color="0.85", label="±20%")
    axes.plot([0, top], [0, top], color="0.4", linewidth=1, label="prediction = measurement")
    for index, target in enumerate(dict.fromkeys(r["target"] for r, _, _ in kept)):
        mine = [(m, p) for r, p, m in kept if r["target"] == target]
        axes.scatter(*zip(*mine, strict=True), color=f"C{index}", label=target, zorder=3)
    axes.set(xlabel="measured ms / token", ylabel="predicted ms / token", xlim=(0, top), ylim=(0, top))
    axes.set_aspect("equal")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return figure
