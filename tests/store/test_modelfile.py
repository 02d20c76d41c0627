"""Modelfile parsing, parameter typing and rendering back (`ollama show --modelfile`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tp_ollama.errors import RequestError
from tp_ollama.store.modelfile import (
    ModelfileError,
    coerce_parameters,
    format_parameters,
    parse_modelfile,
    quote_value,
    render_modelfile,
)

FULL = '''\ufeff# a comment, then every instruction in mixed case
FROM llama3.2:3b
parameter temperature 0.7
PARAMETER top_k 20
PARAMETER stop <|im_end|>
PARAMETER stop "<|endoftext|>"
PARAMETER use_mmap false
Template """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}<|im_start|>user
{{ .Prompt }}<|im_end|>
"""
SYSTEM "You are a pirate."
LICENSE MIT
LICENSE """line one
line two"""
MESSAGE user Is the sea wet?
Message Assistant """Arr,
aye."""
REQUIRES 0.9.0
'''


def test_parses_every_instruction():
    mf = parse_modelfile(FULL.replace("\n", "\r\n"))
    assert mf.from_ == "llama3.2:3b"
    assert mf.parameters == {
        "temperature": 0.7,
        "top_k": 20,
        "stop": ["<|im_end|>", "<|endoftext|>"],
        "use_mmap": False,
    }
    assert isinstance(mf.parameters["top_k"], int) and isinstance(mf.parameters["temperature"], float)
    assert mf.template == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
        "{{ .Prompt }}<|im_end|>\n"
    )
    assert mf.system == "You are a pirate."
    assert mf.license == ["MIT", "line one\nline two"]
    assert mf.messages == [
        {"role": "user", "content": "Is the sea wet?"},
        {"role": "assistant", "content": "Arr,\naye."},
    ]
    assert mf.requires == "0.9.0"


def test_create_request_carries_the_fields():
    request = parse_modelfile(FULL).create_request()
    assert request["from"] == "llama3.2:3b"
    assert request["system"] == "You are a pirate."
    assert request["parameters"]["stop"] == ["<|im_end|>", "<|endoftext|>"]
    assert request["license"] == ["MIT", "line one\nline two"]
    assert [m["role"] for m in request["messages"]] == ["user", "assistant"]
    assert "template" in request
    assert parse_modelfile("FROM x").create_request() == {"from": "x"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM x\nPARAMETER temperature 0.1\nFRM y", '(line 3): command must be one of "from"'),
        ("FROM x\nPARAMETER foo 1", "(line 2): unknown parameter 'foo'"),
        ("FROM x\n\nPARAMETER temperature hot", "(line 3): parameter temperature='hot' is invalid: expected a finite"),
        ("FROM x\nPARAMETER top_k 1.5", "(line 2): parameter top_k='1.5' is invalid: expected an integer"),
        ("FROM x\nPARAMETER use_mmap maybe", "(line 2): parameter use_mmap='maybe' is invalid: expected true or false"),
        ("FROM x\nADAPTER ./lora.gguf", "(line 2): ADAPTER: LoRA adapters are not supported"),
        ("FROM x\nMESSAGE tool hi", '(line 2): message role must be one of "system", "user", or "assistant"'),
        ("FROM x\nMESSAGE", "(line 2): missing role for MESSAGE"),
        ('FROM x\nSYSTEM """never\nclosed\n', '(line 2): unterminated """'),
        ("# only a comment\nSYSTEM hi", "no FROM line"),
        ("FROM a\nFROM b", "(line 2): second FROM (the first is on line 1)"),
        ("FROM", "(line 1): missing value for FROM"),
    ],
)
def test_errors_name_the_line(text, message):
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text)
    assert str(e.value).startswith(message)
    assert isinstance(e.value, RequestError)  # a 400 on the API


def test_coerce_parameters_types_json_values():
    got = coerce_parameters({"num_ctx": 4096.0, "top_k": 40.7, "seed": "7", "temperature": 1, "stop": "###"})
    assert got == {"num_ctx": 4096, "top_k": 40, "seed": 7, "temperature": 1.0, "stop": ["###"]}
    assert type(got["temperature"]) is float and type(got["top_k"]) is int
    assert coerce_parameters({"use_mmap": "TRUE", "num_batch": 8}) == {"use_mmap": True, "num_batch": 8}


def test_coerce_parameters_rejects_unknown_and_bad_values():
    with pytest.raises(RequestError, match="unknown parameter 'temprature'"):
        coerce_parameters({"temprature": 0.1})
    with pytest.raises(RequestError, match="temperature"):
        coerce_parameters({"temperature": True})
    with pytest.raises(RequestError, match="stop"):
        coerce_parameters({"stop": [1, 2]})
    with pytest.raises(RequestError, match="a finite number"):
        coerce_parameters({"top_p": "nan"})


def test_legacy_parameters_are_dropped():
    assert coerce_parameters({"mirostat": 1, "penalize_newline": True, "top_k": 1}) == {"top_k": 1}


def test_resolve_from_prefers_an_existing_path(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert parse_modelfile("FROM ./m.gguf").resolve_from(tmp_path) == tmp_path / "m.gguf"
    assert parse_modelfile("FROM llama3.2").resolve_from(tmp_path) == "llama3.2"
    assert parse_modelfile("FROM ./missing.gguf").resolve_from(tmp_path) == "./missing.gguf"
    digest = "@sha256:" + "a" * 64
    assert parse_modelfile(f"FROM {digest}").resolve_from(tmp_path) == digest
    assert parse_modelfile(f"FROM {tmp_path / 'm.gguf'}").resolve_from(None) == tmp_path / "m.gguf"
    assert parse_modelfile("FROM m.gguf").resolve_from(None) == "m.gguf"


def test_format_parameters_like_ollama_show():
    text = format_parameters({"stop": ["<|im_end|>", 'say "x"'], "temperature": 1.0, "top_p": 0.9, "top_k": 40})
    assert text.splitlines() == [
        'stop                           "<|im_end|>"',
        'stop                           "say \\"x\\""',
        "temperature                    1",
        "top_p                          0.9",
        "top_k                          40",
    ]


@pytest.mark.parametrize(
    "value",
    ["plain", "  leading and trailing  ", "two\nlines", 'has "quotes"\ninside', '"starts with a quote', 'ends "x"\n"'],
)
def test_quoted_values_parse_back(value):
    mf = parse_modelfile(f"FROM x\nSYSTEM {quote_value(value)}\nMESSAGE user {quote_value(value)}\n")
    assert mf.system == value
    assert mf.messages == [{"role": "user", "content": value}]


def test_render_then_parse_round_trips():
    text = render_modelfile(
        name="pirate:latest",
        from_="/models/blobs/sha256-" + "b" * 64,
        template="{{ .System }}\n{{ .Prompt }}",
        system=" Arr. ",
        parameters={"stop": ["<|im_end|>", "###"], "temperature": 0.2, "num_ctx": 2048, "use_mmap": True},
        license=["MIT", "second\nlicense"],
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy\nmatey"}],
    )
    assert text.startswith('# Modelfile generated by "ollama show"\n')
    assert "# FROM pirate:latest\n" in text
    mf = parse_modelfile(text)
    assert mf.from_ == "/models/blobs/sha256-" + "b" * 64
    assert mf.template == "{{ .System }}\n{{ .Prompt }}"
    assert mf.system == " Arr. "
    assert mf.parameters == {"stop": ["<|im_end|>", "###"], "temperature": 0.2, "num_ctx": 2048, "use_mmap": True}
    assert mf.license == ["MIT", "second\nlicense"]
    assert mf.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy\nmatey"}]


def test_modelfile_from_a_file_on_disk(tmp_path: Path):
    (tmp_path / "Modelfile").write_text("FROM ./weights.gguf\nSYSTEM hi\n")
    mf = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert mf.system == "hi"
    assert mf.resolve_from(tmp_path) == "./weights.gguf"  # not there: treated as a name
