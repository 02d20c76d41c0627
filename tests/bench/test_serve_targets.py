"""The targets of `bench serve`: their specs, and what each wire reads from a streamed line (the wires
against real and scripted servers are in test_serve.py)."""

from __future__ import annotations

import pytest

from tp_ollama.bench.serve_targets import OpenAIWire, ServeTarget, parse_target
from tp_ollama.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "label", "kind", "url"),
    [
        ("ollama=http://127.0.0.1:11434", "ollama", "ollama", "http://127.0.0.1:11434"),
        ("ours@ollama=http://127.0.0.1:11434/", "ours", "ollama", "http://127.0.0.1:11434"),
        ("llamacpp=http://10.0.0.2:8080", "llamacpp", "llamacpp", "http://10.0.0.2:8080"),
        ("vllm@openai=https://host.example/api", "vllm", "openai", "https://host.example/api"),
    ],
)
def test_target_specs(spec: str, label: str, kind: str, url: str) -> None:
    assert parse_target(spec, "m") == ServeTarget(label, kind, url, "m")


@pytest.mark.parametrize(
    ("spec", "model", "message"),
    [
        ("http://127.0.0.1:11434", "m", "expected \\[NAME@\\]KIND=URL"),
        ("vllm=http://127.0.0.1:8000", "m", "unknown kind 'vllm': expected one of ollama, llamacpp, openai"),
        ("ollama=127.0.0.1:11434", "m", "expected http://HOST:PORT"),
        ("ollama=http://127.0.0.1:11434", "", "needs a model name"),
        (" @ollama=http://127.0.0.1:11434", "m", "empty NAME"),
    ],
)
def test_bad_target_specs_are_refused(spec: str, model: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_target(spec, model)


def test_openai_wire_reads_usage_and_done() -> None:
    wire = OpenAIWire()
    text = wire.parse('data: {"choices": [{"text": "Hi", "finish_reason": null}]}')
    finish = wire.parse('data: {"choices": [{"text": "", "finish_reason": "length"}]}')
    usage = wire.parse('data: {"choices": [], "usage": {"completion_tokens": 7}}')
    assert text is not None and text.carries_token and not text.final
    assert finish is not None and finish.stop == "length" and not finish.carries_token
    assert usage is not None and usage.tokens == 7 and not usage.final
    done = wire.parse("data: [DONE]")
    assert done is not None and done.final
    assert wire.parse(": keep-alive") is None
