"""Structured outputs at the engine level: the bitmask arithmetic, schema errors, and generations of
a tiny random model (which would write anything) held to a schema by the grammar."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from tests.tiny import write_chat_gguf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.constraint import Grammar, allowed, grammar_for, vocabulary_for
from tp_ollama.engine.direct import GenerationStats, generate_ids
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.protocol import OutputFormat
from tp_ollama.errors import RequestError

# Nested objects, an enum, arrays; bounded, so that even a random model must finish the object.
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer", "maximum": 999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "tags", "address"],
    "additionalProperties": False,
}


def test_allowed_unpacks_bit_i_of_word_i_over_32():
    rng = np.random.default_rng(0)
    words = torch.from_numpy(rng.integers(-(2**31), 2**31, size=40, dtype=np.int64).astype(np.int32))
    reference = [bool((int(words[i // 32]) >> (i % 32)) & 1) for i in range(40 * 32)]
    for start, stop in [(0, 1280), (0, 7), (5, 77), (31, 33), (640, 1279), (1000, 1280)]:
        assert allowed(words, start, stop).tolist() == reference[start:stop], (start, stop)


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "nonsense"}, "nonsense"),
        ({"type": "object", "properties": {"a": {"$ref": "#/missing"}}}, "missing"),
        ({"type": "string", "pattern": "("}, "unclosed group"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_request_error_naming_the_problem(schema, words):
    with pytest.raises(RequestError, match="invalid format schema") as caught:
        grammar_for("schema", schema)
    assert words in str(caught.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    ckpt = open_checkpoint(path)
    model = load_model(ckpt, torch.float32, torch.device("cpu"))
    yield path, model, Tokenizer.for_model(path)
    ckpt.close()


def _generate(tiny, fmt_kind, schema, seed, options=None):
    path, model, tokenizer = tiny
    opts = GenerationOptions.from_ollama({"temperature": 1.0, "seed": seed, "num_predict": 160, **(options or {})})
    stats = GenerationStats()
    prompt = tokenizer.encode("hello world")
    fmt = OutputFormat(fmt_kind, schema)
    ids = list(generate_ids(model, prompt, opts, tokenizer.eos_ids, path=str(path), output_format=fmt, stats=stats))
    return tokenizer.decode(ids), stats


def test_a_random_model_held_to_a_nested_schema_always_validates(tiny):
    for seed in range(8):
        text, stats = _generate(tiny, "schema", BOUNDED_SCHEMA, seed)
        assert stats.done_reason == "stop", text  # the grammar ended it, not num_predict
        jsonschema.validate(json.loads(text), BOUNDED_SCHEMA)


def test_every_sampler_path_respects_the_mask(tiny):
    # Greedy, top-k, nucleus/typical/min-p over candidates, and the untruncated Gumbel draw each see
    # -inf for forbidden tokens; none may pick one.
    for options in ({"temperature": 0}, {"top_k": 5}, {"top_k": 0, "top_p": 0.9, "typical_p": 0.8, "min_p": 0.05},
                    {"top_k": 0, "top_p": 1.0}, {"repeat_penalty": 1.5, "presence_penalty": 1.0}):  # fmt: skip
        text, _ = _generate(tiny, "schema", BOUNDED_SCHEMA, 3, options)
        jsonschema.validate(json.loads(text), BOUNDED_SCHEMA)


def test_format_json_gives_a_json_object(tiny):
    # "json" allows any object, which a random model could extend forever: it must at least be a
    # JSON object prefix throughout and, when it ends, parse.
    text, stats = _generate(tiny, "json", None, 0, {"num_predict": 64})
    assert text.startswith("{")
    if stats.done_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_unconstrained_text_from_the_same_model_is_not_json(tiny):
    # The control: without the grammar this model does not write JSON, so the tests above can fail.
    _, model, tokenizer = tiny
    opts = GenerationOptions.from_ollama({"temperature": 1.0, "seed": 0, "num_predict": 40})
    text = tokenizer.decode(list(generate_ids(model, tokenizer.encode("hello world"), opts, tokenizer.eos_ids)))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_vocabulary_covers_a_tokenizer_larger_than_the_model(tiny):
    path, model, tokenizer = tiny
    assert tokenizer.vocab_size > model.config.vocab_size  # the converter adds <|endoftext|>
    vocab = vocabulary_for(Path(path), model.config.vocab_size)
    grammar = Grammar(vocab, "json", None)
    words = grammar.fill()
    assert words.numel() == (model.config.vocab_size + 31) // 32
    assert allowed(words, 0, model.config.vocab_size).any()
