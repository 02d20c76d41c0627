"""`tp-ollama bench` commands that need no ranks: schema, predict, random-model, and the refusals of the
measuring commands, through the real command line in-process."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tp_ollama.bench import schema as bench_schema
from tp_ollama.cli import app
from tp_ollama.parallel.costmodel import Calibration, Link, predict
from tp_ollama.parallel.shapes import shape_named

runner = CliRunner()


def test_schema_prints_the_report_schema() -> None:
    done = runner.invoke(app, ["bench", "schema"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == bench_schema.SCHEMA


def test_predict_prints_the_cost_models_figures() -> None:
    args = ["bench", "predict", "llama3-8b", "--tp", "1,2", "--latency-us", "100", "--bandwidth-gbs", "0.125"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    rows = [line.split("|") for line in done.output.splitlines() if line.startswith("| 2 |")]
    shape = shape_named("llama3-8b")
    expected = predict(shape, 2, Link.from_us_gbs(100, 0.125), Calibration(25e9, 0.5), "int4", "bfloat16")
    assert float(rows[0][2]) == round(expected.tok_s, 1)
    assert "Warning" not in done.output  # 8B over 1 Gbit/s: two nodes are faster


def test_predict_warns_when_one_node_is_faster() -> None:
    done = runner.invoke(app, ["bench", "predict", "smollm2-135m", "--tp", "1,2", "--latency-us", "2000"])
    assert done.exit_code == 0, done.output
    assert "Warning: TP=2 is predicted at" in done.output


def test_random_model_writes_a_truncated_real_shape(tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = ["bench", "random-model", "llama3.2-1b", str(out), "--layers", "1", "--dtype", "bfloat16"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (2048, 1, 128256)


def test_bad_values_are_named() -> None:
    done = runner.invoke(app, ["bench", "predict", "llama3-70b"])
    assert done.exit_code == 1 and "llama3-70b" in done.output and "llama3-8b" in done.output
    done = runner.invoke(app, ["bench", "decode", "x", "--tp", "1,two"])
    assert done.exit_code != 0 and "--tp '1,two' is invalid" in done.output
    done = runner.invoke(app, ["bench", "serve", "--target", "vllm=http://x"])
    assert done.exit_code == 1 and "vllm" in done.output
