"""The bench report: one JSON-able dict per run (its schema and checks: tp_ollama.bench.schema), statistics,
pairwise ratios, markdown, and the files a run leaves behind.

A report is built with `new_report` + `add_result`, checked by `validate`, and written by `write` as
`<out>.json`, `<out>.md` and the PNG plots of `tp_ollama.bench.plots`. `Progress` is the progress bar the
bench commands show while they measure.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from tp_ollama.bench.schema import KINDS, METRICS, SCHEMA_ID, SUMMARY_METRICS, validate
from tp_ollama.errors import ConfigError


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """A Summary: p50 and p99 interpolated linearly between order statistics (numpy.percentile's default),
    the mean, and n; an empty sample gives nulls with n 0."""
    values = sorted(float(sample) for sample in samples)
    bad = [value for value in values if not math.isfinite(value)]
    if bad:
        raise ConfigError(f"cannot summarize samples holding {bad[0]}: expected finite numbers")
    if not values:
        return {"p50": None, "p99": None, "mean": None, "n": 0}
    return {
        "p50": _percentile(values, 50),
        "p99": _percentile(values, 99),
        "mean": math.fsum(values) / len(values),
        "n": len(values),
    }


def _percentile(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def machine_info(read_bandwidth_gbs: float | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The `machine` object of a report; read_bandwidth_gbs is whatever the caller measured (or None)."""
    return {
        "cpus": os.cpu_count() or 1,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "cpu_model": _cpu_model(cpuinfo),
        "read_bandwidth_gbs": read_bandwidth_gbs,
    }


def _torch_version() -> str | None:
    # Importing torch costs seconds; its installed metadata says the same unless torch is loaded already.
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model(cpuinfo: Path) -> str | None:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM, which starts afresh at exec (ru_maxrss carries
    the parent's peak over into a spawned child)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def new_report(kind: str, settings: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """An empty report of this kind, dated now, describing this machine; argv defaults to sys.argv."""
    if kind not in KINDS:
        raise ConfigError(f"unknown bench report kind {kind!r}: expected one of {', '.join(KINDS)}")
    return {
        "schema": SCHEMA_ID,
        "kind": kind,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [str(arg) for arg in (sys.argv if argv is None else argv)],
        "machine": machine_info(),
        "settings": _plain(settings),
        "results": [],
        "ratios": [],
        "notes": [],
    }


def add_result(
    report: dict[str, Any], target: str, config: dict[str, Any], rounds: int = 1, **metrics: Any
) -> dict[str, Any]:
    """Append one Result and return it; metric names must be in METRICS (checked here, values at validate)."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(
            f"unknown bench metric {unknown[0]!r} for target {target!r}: expected one of " + ", ".join(METRICS)
        )
    result = {"target": target, "config": _plain(config), "rounds": rounds, **_plain(metrics)}
    report["results"].append(result)
    return result


def _plain(value: Any) -> Any:
    """A copy made of JSON types: tuples become lists, numpy scalars and arrays Python numbers and lists."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if not isinstance(value, str | int | float | bool) and value is not None and hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def _figure(result: dict[str, Any], metric: str) -> float | None:
    value = result.get(metric)
    if metric in SUMMARY_METRICS and isinstance(value, dict):
        value = value.get("p50")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def pairwise_ratios(report: dict[str, Any], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Ratios between targets measured under the same config (compared as canonical JSON): for every ordered
    pair of distinct targets, the one seen first is the numerator, and for every metric both hold a number
    (p50 for distributions; a zero denominator is skipped) one entry. Ratios are raw quotients: for
    throughput higher is better, for latencies (ttft_s, itl_s, latency_us...) lower is better. A target seen
    twice under one config counts once, its first result. Replaces report["ratios"] and returns it."""
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise ConfigError(
            f"cannot compute ratios of unknown metric {unknown[0]!r}: expected one of " + ", ".join(METRICS)
        )
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for result in report["results"]:
        group = groups.setdefault(json.dumps(result["config"], sort_keys=True), {})
        group.setdefault(result["target"], result)
    ratios = []
    for group in groups.values():
        targets = list(group.values())
        for i, a in enumerate(targets):
            for b in targets[i + 1 :]:
                for metric in metrics:
                    numerator, denominator = _figure(a, metric), _figure(b, metric)
                    if numerator is None or not denominator:
                        continue
                    ratios.append(
                        {
                            "metric": metric,
                            "config": _plain(a["config"]),
                            "numerator": a["target"],
                            "denominator": b["target"],
                            "ratio": numerator / denominator,
                        }
                    )
    report["ratios"] = ratios
    return ratios


# ---------------------------------------------------------------------------------------------------- markdown


def _num(digits: int, scale: float = 1.0) -> Callable[[Any], str]:
    return lambda value: "-" if value is None else f"{value * scale:.{digits}f}"


def _pair(digits: int, scale: float = 1.0) -> Callable[[Any], str]:
    one = _num(digits, scale)
    return lambda summary: f"{one(summary['p50'])} / {one(summary['p99'])}"


def _per_rank(digits: int) -> Callable[[Any], str]:
    one = _num(digits)
    return lambda values: " / ".join(one(value) for value in values)


def _bandwidth(value: dict[str, Any]) -> str:
    achieved = _per_rank(1)(value["achieved_gbs"])
    fraction = " / ".join(f"{share:.0%}" for share in value["fraction"])
    return f"{achieved} ({fraction})" if fraction else achieved


# Table columns in this order: header (with unit) and how a present (non-null) value reads.
_COLUMNS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "decode_tok_s": ("decode tok/s", _num(1)),
    "prompt_tok_s": ("prompt tok/s", _num(1)),
    "aggregate_tok_s": ("aggregate tok/s", _num(1)),
    "ttft_s": ("TTFT ms p50 / p99", _pair(1, 1e3)),
    "itl_s": ("ITL ms p50 / p99", _pair(1, 1e3)),
    "request_s": ("request s p50 / p99", _pair(2)),
    "requests": ("ok / errors / timeouts", lambda r: f"{r['ok']} / {r['errors']} / {r['timeouts']}"),
    "load_s": ("load s", _num(2)),
    "cold_start_s": ("cold start s", _num(2)),
    "peak_rss_mb": ("peak RSS MiB per rank", _per_rank(0)),
    "bandwidth": ("read GB/s per rank (of machine)", _bandwidth),
    "per_token_ms": (
        "ms/token compute / comm / total",
        lambda t: f"{t['compute']:.2f} / {t['communication']:.2f} / {t['total']:.2f}",
    ),
    "latency_us": ("latency µs p50 / p99", _pair(1)),
    "bandwidth_gbs": ("GB/s", _num(2)),
    "predicted_ms_per_token": ("predicted ms/token", _num(2)),
    "measured_ms_per_token": ("measured ms/token", _num(2)),
    "prediction_error": ("prediction error", lambda e: f"{e:+.1%}"),
    "quality": (
        "top-1 agreement / mean KL / p99 KL / perplexity",
        lambda q: f"{q['top1_agreement']:.2%} / {q['mean_kl']:.4f} / {q['p99_kl']:.4f} / {q['perplexity']:.3f}",
    ),
}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_cell(value)}" for key, value in config.items()) or "-"


def _results_table(results: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(key for result in results for key in result["config"]))
    metrics = [m for m in _COLUMNS if any(result.get(m) is not None for result in results)]
    header = ["target", *keys, *(_COLUMNS[m][0] for m in metrics)]
    rows = [
        [_cell(result["target"]), *(_cell(result["config"][key]) for key in keys),
         *("-" if result.get(m) is None else _cell(_COLUMNS[m][1](result[m])) for m in metrics)]
        for result in results
    ]  # fmt: skip
    return _table(header, rows)


def _machine_text(machine: dict[str, Any]) -> str:
    parts = [f"{machine['cpus']} CPUs", machine["cpu_model"], machine["platform"], f"Python {machine['python']}"]
    parts.append(f"torch {machine['torch']}" if machine["torch"] else "no torch")
    if machine["read_bandwidth_gbs"] is not None:
        parts.append(f"read {machine['read_bandwidth_gbs']:.1f} GB/s")
    return ", ".join(part for part in parts if part)


def to_markdown(report: dict[str, Any]) -> str:
    """A valid report as GitHub markdown: title, settings, link, one table per set of config keys, ratios,
    error samples, notes."""
    blocks = [
        f"# tp-ollama bench {report['kind']}: {report['date']}, {_machine_text(report['machine'])}",
        f"**Settings:** {_config_text(report['settings'])}",
    ]
    link = report.get("link")
    if link:
        blocks.append(
            f"**Link (measured, {link['method']}):** latency {link['latency_us']:.1f} µs, "
            f"bandwidth {link['bandwidth_gbs']:.2f} GB/s; configured: {_config_text(link['configured'])}"
        )
    tables: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for result in report["results"]:
        tables.setdefault(tuple(sorted(result["config"])), []).append(result)
    blocks += [_results_table(results) for results in tables.values()]
    if report["ratios"]:
        rows = [[r["metric"], _config_text(r["config"]), _cell(r["numerator"]), _cell(r["denominator"]),
                 f"{r['ratio']:.3f}"] for r in report["ratios"]]  # fmt: skip
        blocks.append(
            "**Ratios** (numerator / denominator; for latencies lower is better)\n\n"
            + _table(["metric", "config", "numerator", "denominator", "ratio"], rows)
        )
    samples = [f"- {_cell(r['target'])}: {_cell(s)}" for r in report["results"] for s in r.get("error_samples") or []]
    if samples:
        blocks.append("**Error samples**\n\n" + "\n".join(samples))
    if report["notes"]:
        blocks.append("**Notes**\n\n" + "\n".join(f"- {note}" for note in report["notes"]))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------------------------------- files


def plot(report: dict[str, Any], stem: Path) -> list[Path]:
    """PNG charts `<stem>-<chart>.png` for what the results hold; ConfigError when matplotlib is missing."""
    from tp_ollama.bench.plots import plot_report

    return plot_report(report, Path(stem))


def write(report: dict[str, Any], out: Path) -> list[Path]:
    """Validate, then write out (JSON; `.json` is appended unless out ends with it), the markdown beside it
    and the plots; returns the paths written, JSON first."""
    validate(report)
    out = Path(out)
    json_path = out if out.suffix == ".json" else out.with_name(out.name + ".json")
    stem = json_path.with_suffix("")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    md_path = stem.with_name(stem.name + ".md")
    md_path.write_text(to_markdown(report), encoding="utf-8")
    return [json_path, md_path, *plot(report, stem)]


# ---------------------------------------------------------------------------------------------------- progress


class Progress:
    """`with Progress(total, description) as progress: ... progress.advance()`: a rich bar on stderr when it is
    a terminal (description, bar, M/N, elapsed), else one line per step, `[3/10] description`. With
    enabled=False it shows nothing (ranks other than 0, --no-progress); stream defaults to sys.stderr."""

    def __init__(self, total: int, description: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ConfigError(f"progress total must be a whole number >= 0, got {total!r}")
        self.total = total
        self.description = description
        self.done = 0
        self.enabled = enabled
        self._stream = stream
        self._bar: Any = None
        self._task: Any = None

    @property
    def stream(self) -> TextIO:
        # Looked up late: tests and redirections replace sys.stderr after this object is built.
        return self._stream if self._stream is not None else sys.stderr

    def __enter__(self) -> Progress:
        isatty = getattr(self.stream, "isatty", None)
        if self.enabled and callable(isatty) and isatty():
            self._start_rich()
        return self

    def _start_rich(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
        except ImportError:
            return  # plain lines instead
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar = RichProgress(*columns, console=Console(file=self.stream), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total)

    def advance(self, description: str | None = None) -> None:
        """One step done; description, when given, replaces the text shown from now on."""
        self.done += 1
        if description is not None:
            self.description = description
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=self.description)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {self.description}", file=self.stream, flush=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        bar, self._bar = self._bar, None
        if bar is None:
            return
        try:
            bar.stop()
        except Exception:
            pass  # a broken terminal must not hide the outcome of the work itself
