"""tp_ollama.bench.plots: the PNG charts a report's results hold, none for results with nothing to plot, and the
way to install matplotlib when it is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.bench.reports import REPORTS, serve_report
from tp_ollama.bench import report as rp
from tp_ollama.bench.plots import plot_report
from tp_ollama.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pngs(paths: list[Path]) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in paths}


@pytest.mark.parametrize(
    ("kind", "charts"),
    [
        ("serve", ["throughput", "latency"]),
        ("decode", ["decode", "prediction"]),
        ("collectives", ["collectives"]),
        ("compare", ["decode"]),
    ],
)
def test_plot_writes_the_charts_the_results_hold(kind: str, charts: list[str], tmp_path: Path) -> None:
    paths = plot_report(REPORTS[kind](), tmp_path / "out" / "run")
    assert paths == [tmp_path / "out" / f"run-{chart}.png" for chart in charts]
    for name, data in _pngs(paths).items():
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_plot_of_nothing_plottable_writes_nothing(tmp_path: Path) -> None:
    report = rp.new_report("decode", {}, argv=[])
    rp.add_result(report, "x", {}, load_s=1.0)
    assert plot_report(report, tmp_path / "run") == []
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot_report(serve_report(), tmp_path / "run")
