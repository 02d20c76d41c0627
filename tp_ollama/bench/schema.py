"""The JSON Schema of a bench report, which doubles as the documentation of every field and its unit,
and `validate`, which checks a report against it (with jsonschema when installed, else by hand)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from tp_ollama.errors import TpOllamaError

SCHEMA_ID = "tp-ollama-bench/1"
KINDS = ("decode", "serve", "compare", "collectives", "quality")


class ReportError(TpOllamaError):
    """A report that does not follow SCHEMA; the message names the JSON path and what was expected."""


# ---------------------------------------------------------------------------------------------------- schema


def _field(types: str | list[str], description: str, **more: Any) -> dict[str, Any]:
    return {"type": types, "description": description, **more}


def _metric(types: str, description: str, **more: Any) -> dict[str, Any]:
    # Every metric may be null: "not measured" (a peer that has no such figure, a run that failed).
    return _field([types, "null"], description + "; null when not measured", **more)


def _numbers(description: str) -> dict[str, Any]:
    return _metric("array", description, items={"type": "number", "minimum": 0})


def _summary(description: str) -> dict[str, Any]:
    return {"$ref": "#/$defs/Summary", "description": description}


def _record(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return _metric("object", description, required=list(properties), additionalProperties=False, properties=properties)


_SUMMARY = {
    "type": ["object", "null"],
    "description": "A distribution of samples; p50 and p99 interpolate linearly between order statistics "
    "(numpy.percentile's default); all figures are in the unit the metric's name ends with; null when not measured",
    "required": ["p50", "p99", "mean", "n"],
    "additionalProperties": False,
    "properties": {
        "p50": _field(["number", "null"], "median; null when n is 0"),
        "p99": _field(["number", "null"], "99th percentile; null when n is 0"),
        "mean": _field(["number", "null"], "arithmetic mean; null when n is 0"),
        "n": _field("integer", "number of samples", minimum=0),
    },
}

_METRICS: dict[str, dict[str, Any]] = {
    "decode_tok_s": _metric("number", "decode throughput of one sequence, generated tokens per second", minimum=0),
    "decode_tok_s_rounds": _numbers("decode_tok_s of each round, tokens per second, in the order they ran"),
    "prompt_tok_s": _metric("number", "prefill throughput, prompt tokens per second", minimum=0),
    "ttft_s": _summary("time to first token per request, seconds"),
    "itl_s": _summary("inter-token latency: gaps between streamed tokens of a request, seconds"),
    "request_s": _summary("whole request latency, from sending to the last token, seconds"),
    "aggregate_tok_s": _metric(
        "number", "generated tokens of all successful requests per second of wall time", minimum=0
    ),
    "requests": _record(
        "outcome of the requests sent",
        {
            "ok": _field("integer", "requests that completed", minimum=0),
            "errors": _field("integer", "requests that failed (HTTP error, broken stream)", minimum=0),
            "timeouts": _field("integer", "requests cut off by the client's timeout", minimum=0),
        },
    ),
    "error_samples": _metric("array", "a few error messages, verbatim", items={"type": "string"}),
    "load_s": _metric("number", "time to load the model once the processes run, seconds", minimum=0),
    "cold_start_s": _metric("number", "time from launch to the first token served, seconds", minimum=0),
    "peak_rss_mb": _numbers("peak resident memory of each rank, MiB, rank 0 first"),
    "bandwidth": _record(
        "memory traffic of decoding, per rank (rank 0 first)",
        {
            "bytes_per_token": _field("array", "bytes read per generated token", items={"type": "integer"}),
            "achieved_gbs": _field(
                "array", "bytes_per_token x tokens per second, GB/s (1e9 bytes)", items={"type": "number", "minimum": 0}
            ),
            "fraction": _field(
                "array",
                "achieved_gbs / machine.read_bandwidth_gbs (1.0 = the machine's limit); in `compare` the "
                "median over rounds of each round against the read bandwidth probed around it",
                items={"type": "number", "minimum": 0},
            ),
        },
    ),
    "per_token_ms": _record(
        "where the time of one decoded token goes, milliseconds",
        {
            "compute": _field("number", "matmuls, attention and the rest of the local work, ms", minimum=0),
            "communication": _field("number", "collectives between ranks, ms", minimum=0),
            "total": _field("number", "wall time per token, ms", minimum=0),
        },
    ),
    "streams": _record(
        "several requests decoding together through the engine's batch (bench decode --streams)",
        {
            "streams": _field("integer", "requests submitted together", minimum=2),
            "aggregate_tok_s": _field(
                "number", "generated tokens of all of them per second of wall time, their prompts included", minimum=0
            ),
            "decode_tok_s": _field("number", "the sum of each request's decode tokens per second", minimum=0),
            "predicted_tok_s": _field(
                ["number", "null"],
                "the cost model's decode_tok_s, calibrated by one node's runs; null without them",
                minimum=0,
            ),
            "rounds": _field("array", "each round's figures, free-form", items={"type": "object"}),
        },
    ),
    "latency_us": _summary("latency of one collective call, microseconds"),
    "bandwidth_gbs": _metric("number", "payload bytes / median latency of a collective, GB/s (1e9 bytes)", minimum=0),
    "predicted_ms_per_token": _metric("number", "decode time per token the cost model predicts, ms", minimum=0),
    "measured_ms_per_token": _metric("number", "decode time per token measured, ms", minimum=0),
    "prediction_error": _metric("number", "predicted_ms_per_token / measured_ms_per_token - 1 (0.1 = 10% slow)"),
    "quality": _record(
        "next-token distributions against the float32-dequantized model over a fixed text (as llama.cpp's "
        "llama-perplexity --kl-divergence reports them)",
        {
            "top1_agreement": _field(
                "number",
                "fraction of scored positions whose most likely token is the reference's",
                minimum=0,
                maximum=1,
            ),
            "mean_kl": _field("number", "mean KL(reference || target) of the next-token distribution, nats", minimum=0),
            "p99_kl": _field("number", "99th percentile of that KL divergence, nats", minimum=0),
            "max_kl": _field("number", "largest KL divergence at one position, nats", minimum=0),
            "perplexity": _field("number", "exp of the mean negative log-likelihood of the text's tokens", minimum=1),
            "positions": _field("integer", "positions scored", minimum=0),
        },
    ),
    "extra": _metric("object", "anything else a target reports, free-form"),
}
METRICS = tuple(_METRICS)
SUMMARY_METRICS = tuple(name for name, schema in _METRICS.items() if schema.get("$ref") == "#/$defs/Summary")

_RESULT = {
    "type": "object",
    "description": "What one target measured under one configuration",
    "required": ["target", "config", "rounds"],
    "additionalProperties": False,
    "properties": {
        "target": _field("string", "what was measured: an engine, a server, a transport", minLength=1),
        "config": _field(
            "object",
            "the configuration measured, free-form: tp, dtype, quant, prompt_tokens, "
            "gen_tokens, concurrency, backend, op, bytes, ranks...",
        ),
        "rounds": _field("integer", "measured repetitions behind the figures (warm-up excluded)", minimum=0),
        **_METRICS,
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": f"tp-ollama bench report ({SCHEMA_ID})",
    "description": "What `tp-ollama bench` measured: the machine, what was asked, one result per target and "
    "configuration, and ratios between targets. Rates use 1e9 bytes per GB.",
    "type": "object",
    "required": ["schema", "kind", "date", "command", "machine", "settings", "results", "ratios", "notes"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_ID, "description": "version of this format"},
        "kind": {"enum": list(KINDS), "description": "the bench subcommand that wrote the report"},
        "date": _field("string", "when the run started, ISO-8601 with UTC offset", format="date-time"),
        "command": _field("array", "the command line (argv)", items={"type": "string"}),
        "machine": {
            "type": "object",
            "description": "the machine the run happened on",
            "required": ["cpus", "platform", "python", "torch", "cpu_model", "read_bandwidth_gbs"],
            "additionalProperties": False,
            "properties": {
                "cpus": _field("integer", "logical CPUs (os.cpu_count)", minimum=1),
                "platform": _field("string", "platform.platform()"),
                "python": _field("string", "Python version"),
                "torch": _field(["string", "null"], "PyTorch version; null when not installed"),
                "cpu_model": _field(["string", "null"], "/proc/cpuinfo model name; null when unknown"),
                "read_bandwidth_gbs": _field(
                    ["number", "null"], "measured memory read bandwidth, GB/s; null when not measured", minimum=0
                ),
                "host_read_bandwidth_gbs": _field(
                    "number",
                    "read bandwidth with every CPU of the machine, GB/s, where the run was pinned to fewer "
                    "(the bus that ranks pinned to different cores of one machine share)",
                    minimum=0,
                ),
                "read_bandwidth_probes_gbs": _field(
                    "array",
                    "each measurement of the read bandwidth during the run (on a shared host it moves); "
                    "read_bandwidth_gbs is the highest",
                    items={"type": "number", "minimum": 0},
                ),
            },
        },
        "settings": _field("object", "what the run was asked to do, free-form"),
        "link": {
            "type": "object",
            "description": "the link between hosts as measured (not as configured); absent when not measured",
            "required": ["latency_us", "bandwidth_gbs", "method", "configured"],
            "additionalProperties": False,
            "properties": {
                "latency_us": _field("number", "one-way latency of a small message, microseconds", minimum=0),
                "bandwidth_gbs": _field("number", "throughput of large messages, GB/s", minimum=0),
                "method": _field("string", "how it was measured"),
                "configured": _field("object", "the link as configured (simulated delay, rate...), free-form"),
            },
        },
        "results": _field("array", "one entry per target and configuration", items={"$ref": "#/$defs/Result"}),
        "ratios": _field(
            "array",
            "numerator / denominator of one metric for two targets measured under the same "
            "configuration; raw quotients, so for latencies lower is better",
            items={"$ref": "#/$defs/Ratio"},
        ),
        "notes": _field("array", "remarks for the reader: caveats, skipped targets", items={"type": "string"}),
    },
    "$defs": {
        "Summary": _SUMMARY,
        "Result": _RESULT,
        "Ratio": {
            "type": "object",
            "description": "one metric of two targets under one configuration",
            "required": ["metric", "config", "numerator", "denominator", "ratio"],
            "additionalProperties": False,
            "properties": {
                "metric": {"enum": list(METRICS), "description": "the metric compared; p50 for distributions"},
                "config": _field("object", "the configuration both results share"),
                "numerator": _field("string", "target whose figure is divided"),
                "denominator": _field("string", "target whose figure divides"),
                "ratio": _field("number", "numerator's figure / denominator's figure"),
            },
        },
    },
}


# ---------------------------------------------------------------------------------------------------- validation


def _path(parts: Sequence[str | int]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or "report"


def _show(value: Any) -> str:
    text = json.dumps(value) if _is_json(value) else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    # JSON Schema counts 2.0 as an integer; jsonschema agrees.
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
}


def _problem(keyword: str, expected: Any, instance: Any, schema: dict[str, Any]) -> tuple[str | None, str]:
    """(key to append to the path, what is wrong) for a failed keyword; the same words with or without jsonschema."""
    if keyword == "type":
        names = [expected] if isinstance(expected, str) else expected
        return None, f"expected {' or '.join(names)}, got {_show(instance)}"
    if keyword == "required":
        missing = [key for key in expected if key not in instance]
        return missing[0], "missing; required here: " + ", ".join(expected)
    if keyword == "additionalProperties":
        known = list(schema.get("properties", {}))
        unknown = [key for key in instance if key not in known]
        return unknown[0], "unknown key; expected one of: " + ", ".join(known)
    if keyword == "enum":
        return None, f"expected one of {', '.join(map(str, expected))}, got {_show(instance)}"
    if keyword == "const":
        return None, f"expected {json.dumps(expected)}, got {_show(instance)}"
    if keyword == "minimum":
        return None, f"expected a number >= {expected}, got {_show(instance)}"
    if keyword == "minLength":
        return None, f"expected a string of at least {expected} characters, got {_show(instance)}"
    return None, f"fails {keyword}={expected!r}"


def _hand_errors(instance: Any, schema: dict[str, Any], path: list[str | int]) -> Iterator[tuple[str, str]]:
    """(path, problem) for each failure, for the subset of JSON Schema that SCHEMA uses, keyword by keyword in
    schema order as jsonschema goes, so both name the same first problem."""
    for keyword, expected in schema.items():
        if keyword == "$ref":
            yield from _hand_errors(instance, SCHEMA["$defs"][expected.rsplit("/", 1)[-1]], path)
            continue
        if keyword == "properties" and isinstance(instance, dict):
            for key, sub in expected.items():
                if key in instance:
                    yield from _hand_errors(instance[key], sub, [*path, key])
            continue
        if keyword == "items" and isinstance(instance, list):
            for index, item in enumerate(instance):
                yield from _hand_errors(item, expected, [*path, index])
            continue
        if _hand_fails(keyword, expected, instance, schema):
            key, problem = _problem(keyword, expected, instance, schema)
            yield _path([*path, key] if key is not None else path), problem


def _hand_fails(keyword: str, expected: Any, instance: Any, schema: dict[str, Any]) -> bool:
    if keyword == "type":
        return not any(_TYPES[name](instance) for name in ([expected] if isinstance(expected, str) else expected))
    if keyword == "required":
        return isinstance(instance, dict) and any(key not in instance for key in expected)
    if keyword == "additionalProperties":
        return isinstance(instance, dict) and any(key not in schema.get("properties", {}) for key in instance)
    if keyword == "enum":
        return instance not in expected
    if keyword == "const":
        return bool(instance != expected)
    if keyword == "minimum":
        return _TYPES["number"](instance) and instance < expected
    if keyword == "minLength":
        return isinstance(instance, str) and len(instance) < expected
    return False


def _load_jsonschema() -> ModuleType | None:
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema


def _schema_errors(report: Any) -> list[tuple[str, str]]:
    jsonschema = _load_jsonschema()
    if jsonschema is None:
        return list(_hand_errors(report, SCHEMA, []))
    errors = []
    for error in jsonschema.Draft202012Validator(SCHEMA).iter_errors(report):
        key, problem = _problem(str(error.validator), error.validator_value, error.instance, error.schema)
        parts = list(error.absolute_path)
        errors.append((_path([*parts, key] if key is not None else parts), problem))
    return errors


def _nonfinite(value: Any, path: list[str | int]) -> Iterator[tuple[str, str]]:
    if isinstance(value, float) and not math.isfinite(value):
        yield _path(path), f"expected a finite number (JSON has no NaN or infinity), got {value}"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nonfinite(item, [*path, str(key)])
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _nonfinite(item, [*path, index])


def _summary_errors(report: dict[str, Any]) -> Iterator[tuple[str, str]]:
    # What the schema cannot say: an empty sample has no figures, and the median never exceeds p99.
    for index, result in enumerate(report["results"]):
        for metric in SUMMARY_METRICS:
            summary = result.get(metric)
            if summary is None:
                continue
            where = _path(["results", index, metric])
            figures = (summary["p50"], summary["p99"], summary["mean"])
            if summary["n"] == 0 and any(figure is not None for figure in figures):
                yield where, f"n is 0 but p50/p99/mean are not all null: {_show(summary)}"
            elif summary["p50"] is not None and summary["p99"] is not None and summary["p50"] > summary["p99"]:
                yield where, f"p50 {summary['p50']} exceeds p99 {summary['p99']}"


def validate(report: dict[str, Any]) -> None:
    """Raise ReportError unless the report follows SCHEMA (with jsonschema when installed, else by hand) and
    holds only finite numbers; the message names the first problem's JSON path, e.g. `results[2].ttft_s.p50`."""
    errors = list(_nonfinite(report, [])) or _schema_errors(report) or list(_summary_errors(report))
    if errors:
        path, problem = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ReportError(f"invalid bench report at {path}: {problem}{more}")


# ---------------------------------------------------------------------------------------------------- building
