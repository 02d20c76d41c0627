"""Structured outputs (checklist item 11) on the real instruct model, through the ollama and openai
clients: format "json", format {schema} (streamed and not), OpenAI's response_format, and the 400s
for formats that cannot be enforced."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import ollama
import openai
import pytest

from tests.server.conftest import SMOL, LiveServer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "role": {"enum": ["pilot", "cook", "doctor"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "skills", "home"],
    "additionalProperties": False,  # else a 135M model adds keys until num_predict runs out
}
ASK = [{"role": "user", "content": "Invent a person and describe them as JSON."}]
OPTIONS = {"temperature": 0, "num_predict": 96}


@pytest.fixture
def client(server: LiveServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=120) as client:
        yield client


@pytest.fixture
def oai(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="ollama", max_retries=0) as client:
        yield client


COLORS = "Name one color as JSON."  # short answers: a 135M model can loop in a long one


def test_checklist_11_format_json_gives_a_json_object(client):
    reply = client.generate(model=SMOL, prompt=COLORS, format="json", options=OPTIONS)
    assert isinstance(json.loads(reply.response), dict)
    assert reply.done_reason == "stop"


def test_checklist_11_format_schema_validates_streamed_and_not(client):
    whole = client.chat(model=SMOL, messages=ASK, format=PERSON, options=OPTIONS)
    jsonschema.validate(json.loads(whole.message.content), PERSON)
    pieces = client.chat(model=SMOL, messages=ASK, format=PERSON, options={**OPTIONS, "seed": 3}, stream=True)
    jsonschema.validate(json.loads("".join(p.message.content for p in pieces)), PERSON)


def test_checklist_11_free_text_from_the_same_request_is_not_this_json(client):
    # The control that keeps the tests above honest: unconstrained, the model writes prose or fences.
    reply = client.chat(model=SMOL, messages=ASK, options=OPTIONS)
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(reply.message.content), PERSON)


@pytest.mark.parametrize(
    ("fmt", "words"),
    [
        ("yaml", 'invalid format: "yaml"'),
        (5, "invalid format: 5"),
        ({"type": "nonsense"}, "invalid format schema"),
        ({"type": "string", "pattern": "("}, "unclosed group"),
    ],
)
def test_checklist_11_other_format_values_are_an_error(http, fmt, words):
    # Raw HTTP: the ollama client itself refuses some of these before sending.
    for path, body in (("/api/generate", {"prompt": "hi"}), ("/api/chat", {"messages": ASK})):
        refused = http.post(path, json={"model": SMOL, **body, "format": fmt})
        assert refused.status_code == 400 and words in refused.json()["error"]


def test_openai_response_format_json_object_and_json_schema(oai):
    colors = [{"role": "user", "content": COLORS}]
    as_object = oai.chat.completions.create(
        model=SMOL, messages=colors, temperature=0, max_tokens=96, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    streamed = oai.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=96, response_format=schema, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=SMOL, messages=ASK, response_format={"type": "xml"})
    assert "invalid response_format" in refused.value.body["message"]
