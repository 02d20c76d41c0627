"""tp_ollama.bench.report: statistics, ratios, markdown, files and the progress lines, on reports built by hand
(the schema's checks: test_schema.py; the charts: test_plots.py)."""

from __future__ import annotations

import copy
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.bench.reports import compare_report, decode_report, serve_report
from tp_ollama.bench import report as rp
from tp_ollama.bench import schema as bench_schema
from tp_ollama.errors import ConfigError


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_summarize_matches_numpy(n: int) -> None:
    samples = list(np.random.default_rng(n).exponential(size=n))
    summary = rp.summarize(samples)
    assert summary["n"] == n
    assert summary["p50"] == pytest.approx(float(np.percentile(samples, 50)))
    assert summary["p99"] == pytest.approx(float(np.percentile(samples, 99)))
    assert summary["mean"] == pytest.approx(float(np.mean(samples)))


def test_summarize_known_samples() -> None:
    assert rp.summarize([4.0, 1.0, 3.0, 2.0]) == {"p50": 2.5, "p99": pytest.approx(3.97), "mean": 2.5, "n": 4}
    assert rp.summarize([7]) == {"p50": 7.0, "p99": 7.0, "mean": 7.0, "n": 1}
    assert rp.summarize([]) == {"p50": None, "p99": None, "mean": None, "n": 0}
    with pytest.raises(ConfigError, match="nan"):
        rp.summarize([1.0, math.nan])


def test_machine_info(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6130\n")
    info = rp.machine_info(read_bandwidth_gbs=12.5, cpuinfo=cpuinfo)
    assert info["cpu_model"] == "Intel(R) Xeon(R) Gold 6130"
    assert info["read_bandwidth_gbs"] == 12.5
    assert info["cpus"] >= 1 and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"] is None or info["torch"][0].isdigit()
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # aarch64 has no model name
    assert rp.machine_info(cpuinfo=cpuinfo)["cpu_model"] is None
    assert rp.machine_info(cpuinfo=tmp_path / "absent")["cpu_model"] is None


def test_new_report_and_add_result_refuse_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown bench report kind 'bogus'"):
        rp.new_report("bogus", {})
    report = rp.new_report("decode", {}, argv=("tp-ollama",))
    with pytest.raises(ConfigError, match=r"unknown bench metric 'tok_s'.*expected one of.*decode_tok_s"):
        rp.add_result(report, "x", {}, tok_s=1.0)
    result = rp.add_result(
        report, "x", {"shape": (1, 2)}, decode_tok_s=np.float32(2.5), peak_rss_mb=np.array([1.0, 2.0])
    )
    assert result == {"target": "x", "config": {"shape": [1, 2]}, "rounds": 1, "decode_tok_s": 2.5,
                      "peak_rss_mb": [1.0, 2.0]}  # fmt: skip
    assert type(result["decode_tok_s"]) is float and type(result["peak_rss_mb"]) is list
    assert report["results"] == [result] and report["command"] == ["tp-ollama"]
    bench_schema.validate(report)


def test_pairwise_ratios_by_config_and_pair() -> None:
    report = rp.new_report("compare", {}, argv=[])
    rp.add_result(report, "a", {"tp": 1, "dtype": "bf16"}, decode_tok_s=30.0, ttft_s=rp.summarize([0.2, 0.4]))
    rp.add_result(report, "b", {"dtype": "bf16", "tp": 1}, decode_tok_s=20.0, ttft_s=rp.summarize([0.1]))
    rp.add_result(report, "c", {"tp": 1, "dtype": "bf16"}, decode_tok_s=None, ttft_s=rp.summarize([0.5]))
    rp.add_result(report, "b", {"tp": 2, "dtype": "bf16"}, decode_tok_s=50.0)
    rp.add_result(report, "a", {"tp": 2, "dtype": "bf16"}, decode_tok_s=40.0)
    rp.add_result(report, "a", {"tp": 4}, decode_tok_s=99.0)  # alone in its config: no pair
    report["ratios"] = [{"stale": True}]
    ratios = rp.pairwise_ratios(report, ["decode_tok_s", "ttft_s"])
    tp1, tp2 = {"tp": 1, "dtype": "bf16"}, {"tp": 2, "dtype": "bf16"}
    assert [(r["numerator"], r["denominator"], r["metric"], r["config"]) for r in ratios] == [
        ("a", "b", "decode_tok_s", tp1), ("a", "b", "ttft_s", tp1),
        ("a", "c", "ttft_s", tp1),  # c has no decode_tok_s
        ("b", "c", "ttft_s", tp1),
        ("b", "a", "decode_tok_s", tp2),  # b was seen first under tp=2
    ]  # fmt: skip
    assert [r["ratio"] for r in ratios] == pytest.approx([1.5, 3.0, 0.6, 0.2, 1.25])
    assert report["ratios"] is ratios
    bench_schema.validate(report)
    with pytest.raises(ConfigError, match="unknown metric 'speed'"):
        rp.pairwise_ratios(report, ["speed"])


def test_markdown_of_a_serve_report() -> None:
    text = rp.to_markdown(serve_report())
    lines = text.splitlines()
    assert lines[0].startswith("# tp-ollama bench serve: ") and "CPUs" in lines[0]
    assert "**Settings:** rounds=3, model=tiny" in text
    header = "| target | concurrency | gen_tokens | aggregate tok/s | TTFT ms p50 / p99 | ITL ms p50 / p99 |"
    assert header + " request s p50 / p99 | ok / errors / timeouts |" in lines
    assert "| tp-ollama | 2 | 32 | 60.0 | 300.0 / 398.0 | 40.0 / 40.0 | 1.50 / 1.99 | 8 / 0 / 0 |" in lines
    assert "cold start" not in text  # null everywhere: no column


def test_markdown_of_a_compare_report_has_link_ratios_and_notes() -> None:
    report = compare_report()
    report["results"][0]["error_samples"] = ["HTTP 500 | boom"]
    text = rp.to_markdown(report)
    assert "**Link (measured, ping-pong):** latency 50.0 µs, bandwidth 1.20 GB/s; configured: delay_us=50" in text
    assert "| tp-ollama | q4_k_m | 30.0 | 300.0 / 300.0 |" in text
    assert "| decode_tok_s | quant=q4_k_m | tp-ollama | ollama | 0.750 |" in text
    assert "| ttft_s | quant=q4_k_m | ollama | llama.cpp | 0.800 |" in text
    assert "- tp-ollama: HTTP 500 \\| boom" in text
    assert text.endswith("**Notes**\n\n- vllm skipped: not installed\n")


def test_markdown_splits_tables_by_config_keys() -> None:
    report = decode_report()
    rp.add_result(report, "ollama", {"quant": "q4_0"}, decode_tok_s=55.56)
    text = rp.to_markdown(report)
    assert text.count("| target |") == 2
    assert "| target | quant | decode tok/s |\n|---|---|---|\n| ollama | q4_0 | 55.6 |" in text
    assert "| tp-ollama | 2 | bf16 | 64 | 70.0 | 700.0 | 1.50 | 512 / 512 | 4.0 / 4.0 (20% / 20%) |" in text
    assert "| 10.00 / 1.00 / 14.29 | 15.71 | 14.29 | +10.0% |" in text  # ms/token split, predicted, measured


def test_write_round_trips(tmp_path: Path) -> None:
    report = serve_report()
    paths = rp.write(report, tmp_path / "new" / "dir" / "serve.json")
    folder = tmp_path / "new" / "dir"
    assert paths == [folder / "serve.json", folder / "serve.md", folder / "serve-throughput.png",
                     folder / "serve-latency.png"]  # fmt: skip
    text = paths[0].read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "schema": "tp-ollama-bench/1"')
    assert json.loads(text) == report
    assert paths[1].read_text() == rp.to_markdown(report)


def test_write_appends_json_and_refuses_an_invalid_report(tmp_path: Path) -> None:
    report = compare_report()
    assert rp.write(report, tmp_path / "run.v1")[:2] == [tmp_path / "run.v1.json", tmp_path / "run.v1.md"]
    broken = copy.deepcopy(report)
    broken["results"][0]["decode_tok_s"] = math.nan
    with pytest.raises(bench_schema.ReportError, match=r"results\[0\]\.decode_tok_s"):
        rp.write(broken, tmp_path / "broken.json")
    assert not (tmp_path / "broken.json").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_one_line_per_step_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with rp.Progress(3, "warm-up") as progress:
        progress.advance()
        progress.advance("tp=2")
        progress.advance()
    captured = capsys.readouterr()
    assert captured.err == "[1/3] warm-up\n[2/3] tp=2\n[3/3] tp=2\n"
    assert captured.out == ""


def test_disabled_progress_shows_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    terminal = _Terminal()
    for stream in (None, terminal):
        with rp.Progress(2, "decode", stream=stream, enabled=False) as progress:
            progress.advance()
            progress.advance("tp=2")
        assert progress.done == 2
    assert capsys.readouterr().err == "" and terminal.getvalue() == ""


def test_progress_lets_the_error_of_the_work_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="engine died"), rp.Progress(2, "decode") as progress:
        progress.advance()
        raise RuntimeError("engine died")
    assert capsys.readouterr().err == "[1/2] decode\n"
    with pytest.raises(ConfigError, match="progress total"):
        rp.Progress(-1, "x")


def test_progress_draws_a_rich_bar_on_a_terminal() -> None:
    terminal = _Terminal()
    with pytest.raises(KeyError), rp.Progress(4, "collectives", stream=terminal) as progress:
        for _ in range(4):
            progress.advance("all_reduce")
        raise KeyError("after the bar is full")
    text = terminal.getvalue()
    assert "all_reduce" in text and "4/4" in text
    assert "[4/4]" not in text  # the bar, not plain lines


def test_progress_falls_back_to_lines_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "rich", None)
    terminal = _Terminal()
    with rp.Progress(1, "decode", stream=terminal) as progress:
        progress.advance()
    assert terminal.getvalue() == "[1/1] decode\n"
