"""tp_ollama.bench.schema: the schema accepts what the bench commands write and names the path of every kind of
mistake, with jsonschema and with the checks validate does without it, on reports built by hand."""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import pytest

from tests.bench.reports import REPORTS, serve_report
from tp_ollama.bench import schema
from tp_ollama.bench.schema import SCHEMA, ReportError, validate
from tp_ollama.errors import TpOllamaError


@pytest.fixture(params=[False, True], ids=["jsonschema", "by-hand"])
def by_hand(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a validation test with jsonschema and again with the checks validate does without it."""
    if request.param:
        monkeypatch.setattr(schema, "_load_jsonschema", lambda: None)
    return bool(request.param)


def test_schema_is_a_valid_draft_2020_12_schema_documented_field_by_field() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert json.loads(json.dumps(SCHEMA, indent=2)) == SCHEMA  # `tp-ollama bench schema` prints it
    assert SCHEMA["$schema"].endswith("2020-12/schema")

    def undocumented(schema: dict[str, Any], path: str) -> list[str]:
        missing = [path] if "description" not in schema and "$ref" not in schema else []
        for key, sub in schema.get("properties", {}).items():
            missing += [*undocumented(sub, f"{path}.{key}")]
        return missing

    defs = SCHEMA["$defs"]
    assert undocumented(SCHEMA, "report") + [p for name, d in defs.items() for p in undocumented(d, name)] == []
    assert all("description" in schema for schema in SCHEMA["$defs"]["Result"]["properties"].values())


@pytest.mark.parametrize("kind", REPORTS)
def test_a_full_report_of_each_kind_is_valid(kind: str, by_hand: bool) -> None:
    report = REPORTS[kind]()
    validate(report)
    jsonschema.validate(report, SCHEMA, cls=jsonschema.Draft202012Validator)
    assert report["kind"] == kind and report["command"] == ["tp-ollama", "bench", kind]


def _break(report: dict[str, Any], change: str) -> None:
    if change == "missing target":
        del report["results"][1]["target"]
    elif change == "missing top-level key":
        del report["notes"]
    elif change == "rounds as text":
        report["results"][0]["rounds"] = "3"
    elif change == "bool as a number":
        report["results"][1]["aggregate_tok_s"] = True
    elif change == "unknown metric":
        report["results"][2]["tokens_per_s"] = 1.0
    elif change == "NaN":
        report["results"][2]["ttft_s"]["p50"] = math.nan
    elif change == "inf in settings":
        report["settings"]["deadline"] = math.inf
    elif change == "Summary without n":
        del report["results"][2]["itl_s"]["n"]
    elif change == "Summary p50 as text":
        report["results"][2]["ttft_s"]["p50"] = "fast"
    elif change == "Summary with extra key":
        report["results"][2]["ttft_s"]["p90"] = 1.0
    elif change == "Summary figures with n 0":
        report["results"][2]["ttft_s"]["n"] = 0
    elif change == "Summary p50 above p99":
        report["results"][2]["ttft_s"]["p50"] = 9.0
    elif change == "negative count":
        report["results"][3]["requests"]["errors"] = -1
    elif change == "unknown kind":
        report["kind"] = "bogus"
    elif change == "machine without torch":
        del report["machine"]["torch"]
    elif change == "tuple instead of list":
        report["results"][0]["error_samples"] = ("boom",)
    else:
        raise AssertionError(change)


MISTAKES = {
    "missing target": ("results[1].target", "missing"),
    "missing top-level key": ("notes", "missing"),
    "rounds as text": ("results[0].rounds", "expected integer"),
    "bool as a number": ("results[1].aggregate_tok_s", "expected number or null"),
    "unknown metric": ("results[2].tokens_per_s", "unknown key; expected one of: target, config, rounds, decode_tok_s"),
    "NaN": ("results[2].ttft_s.p50", "finite number"),
    "inf in settings": ("settings.deadline", "finite number"),
    "Summary without n": ("results[2].itl_s.n", "missing"),
    "Summary p50 as text": ("results[2].ttft_s.p50", 'expected number or null, got "fast" (str)'),
    "Summary with extra key": ("results[2].ttft_s.p90", "unknown key; expected one of: p50, p99, mean, n"),
    "Summary figures with n 0": ("results[2].ttft_s", "n is 0"),
    "Summary p50 above p99": ("results[2].ttft_s", "p50 9.0 exceeds p99"),
    "negative count": ("results[3].requests.errors", "expected a number >= 0, got -1"),
    "unknown kind": ("kind", "expected one of decode, serve, compare, collectives"),
    "machine without torch": ("machine.torch", "missing"),
    "tuple instead of list": ("results[0].error_samples", "expected array or null"),
}


@pytest.mark.parametrize("change", MISTAKES)
def test_each_mistake_is_rejected_naming_its_path(change: str, by_hand: bool) -> None:
    report = serve_report()
    _break(report, change)
    path, expected = MISTAKES[change]
    with pytest.raises(ReportError, match="invalid bench report") as caught:
        validate(report)
    assert f" at {path}: " in str(caught.value)
    assert expected in str(caught.value)
    assert isinstance(caught.value, TpOllamaError)


def test_more_problems_are_counted(by_hand: bool) -> None:
    report = serve_report()
    report["results"][0]["rounds"] = "1"
    report["results"][1]["rounds"] = "1"
    with pytest.raises(ReportError, match=r"at results\[0\]\.rounds: .*\(and 1 more problems\)"):
        validate(report)


def test_a_report_that_is_not_an_object_is_rejected(by_hand: bool) -> None:
    with pytest.raises(ReportError, match=r"at report: expected object, got \[\] \(list\)"):
        validate([])  # type: ignore[arg-type]
