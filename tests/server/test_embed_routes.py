"""Embeddings (checklist 19): /api/embed, the legacy /api/embeddings and /v1/embeddings, through the
official ollama and openai clients and raw HTTP, against the live server (smollm2:135m on CPU)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import ollama
import openai
import pytest

from tests.server.conftest import SMOL, LiveServer
from tests.server.doubles import EmbeddedModels
from tp_ollama.checkpoints.tokenizer import Tokenizer

HIDDEN = 576  # smollm2-135m's hidden size
TOL = 1e-4
SENTENCES = ["The cat sat on the mat.", "Stock markets fell sharply on Tuesday.", "How do I bake bread at home?"]


@pytest.fixture
def client(server: LiveServer) -> Iterator[ollama.Client]:
    client = ollama.Client(host=server.url, timeout=120)
    yield client
    client._client.close()


@pytest.fixture
def oai(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="ollama", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(EmbeddedModels().resolve(SMOL).path)


def rows(vectors: object) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float64)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_checklist_19_embed_gives_one_unit_row_per_input_in_order(client):
    reply = client.embed(model=SMOL, input=SENTENCES)
    e = rows(reply.embeddings)
    assert reply.model == SMOL
    assert e.shape == (3, HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert reply.prompt_eval_count > 3 and reply.total_duration > 0 and reply.load_duration is not None
    # Order kept: each row is the one that input gives alone.
    alone = rows(client.embed(model=SMOL, input=SENTENCES[1]).embeddings)
    assert alone.shape == (1, HIDDEN)
    np.testing.assert_allclose(e[1], alone[0], atol=TOL)


def test_checklist_19_a_batch_of_three_equals_three_single_calls(client):
    batch = rows(client.embed(model=SMOL, input=SENTENCES).embeddings)
    single = rows([client.embed(model=SMOL, input=s).embeddings[0] for s in SENTENCES])
    np.testing.assert_allclose(batch, single, atol=TOL)
    assert not np.allclose(batch[0], batch[1], atol=TOL)  # distinct inputs, distinct rows


def test_checklist_19_dimensions_truncates_then_renormalises(client):
    full = rows(client.embed(model=SMOL, input=SENTENCES[:2]).embeddings)
    cut = rows(client.embed(model=SMOL, input=SENTENCES[:2], dimensions=64).embeddings)
    assert cut.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cut, unit(full[:, :64]), atol=TOL)
    assert rows(client.embed(model=SMOL, input="x", dimensions=HIDDEN).embeddings).shape == (1, HIDDEN)


@pytest.mark.parametrize(("dimensions", "expected"), [(0, "dimensions=0"), (-3, "dimensions=-3"), (HIDDEN + 1, "")])
def test_checklist_19_dimensions_out_of_range_is_400_naming_the_range(client, dimensions, expected):
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=SMOL, input="hello", dimensions=dimensions)
    assert e.value.status_code == 400
    assert f"dimensions={dimensions}" in e.value.error and "expected 1 to" in e.value.error
    if dimensions > HIDDEN:
        assert f"expected 1 to {HIDDEN}" in e.value.error


def test_checklist_19_legacy_embeddings_are_not_normalised_but_point_the_same_way(client):
    legacy = rows(client.embeddings(model=SMOL, prompt=SENTENCES[0]).embedding)
    normalised = rows(client.embed(model=SMOL, input=SENTENCES[0]).embeddings[0])
    assert legacy.shape == (HIDDEN,)
    assert abs(np.linalg.norm(legacy) - 1.0) > 1e-2
    np.testing.assert_allclose(unit(legacy), normalised, atol=TOL)


def test_checklist_19_empty_input_loads_and_gives_no_rows(client, http):
    assert client.embed(model=SMOL, input="").embeddings == []
    for body in ({"model": SMOL, "input": []}, {"model": SMOL}):
        reply = http.post("/api/embed", json=body)
        assert reply.status_code == 200 and reply.json() == {"model": SMOL, "embeddings": []}
    assert client.embeddings(model=SMOL, prompt="").embedding == []
    assert [m.name for m in client.ps().models] == [SMOL]


def test_checklist_19_an_empty_string_in_a_list_is_400_naming_it(http):
    reply = http.post("/api/embed", json={"model": SMOL, "input": ["hello", ""]})
    assert reply.status_code == 400 and "input 1 is empty" in reply.json()["error"]


def test_checklist_19_truncate_cuts_to_num_ctx_and_false_refuses(client, oai, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert len(ids) > 16
    reply = client.embed(model=SMOL, input=text, options={"num_ctx": 16})
    assert reply.prompt_eval_count == 16
    # The same as embedding the first 16 tokens.
    first16 = oai.embeddings.create(model=SMOL, input=[ids[:16]], encoding_format="float").data[0].embedding
    np.testing.assert_allclose(rows(reply.embeddings[0]), rows(first16), atol=TOL)
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=SMOL, input=["short", text], truncate=False, options={"num_ctx": 16})
    assert e.value.status_code == 400
    assert "the input length exceeds the context length" in e.value.error
    assert f"input 1 is {len(ids)} tokens" in e.value.error and "num_ctx is 16" in e.value.error


def test_checklist_19_unknown_model_is_404_on_every_route(client, oai):
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="nope:1b", input="hi")
    assert e.value.status_code == 404 and e.value.error == "model 'nope:1b' not found"
    with pytest.raises(ollama.ResponseError) as e:
        client.embeddings(model="nope:1b", prompt="hi")
    assert e.value.status_code == 404 and e.value.error == 'model "nope:1b" not found, try pulling it first'
    with pytest.raises(openai.NotFoundError) as oe:
        oai.embeddings.create(model="nope:1b", input="hi")
    assert "not found" in str(oe.value)


@pytest.mark.parametrize("value", [5, [1, "a"], {"a": 1}, True])
def test_checklist_19_invalid_input_type_is_400(http, value):
    reply = http.post("/api/embed", json={"model": SMOL, "input": value})
    assert reply.status_code == 400 and reply.json() == {"error": "invalid input type"}


def test_openai_embeddings_equal_the_native_ones_in_float_and_base64(client, oai):
    native = client.embed(model=SMOL, input=SENTENCES)
    replies = {
        # The openai client asks for base64 when not told otherwise, and decodes it itself.
        "default": oai.embeddings.create(model=SMOL, input=SENTENCES),
        "float": oai.embeddings.create(model=SMOL, input=SENTENCES, encoding_format="float"),
        "base64": oai.embeddings.create(model=SMOL, input=SENTENCES, encoding_format="base64"),
    }
    for fmt, reply in replies.items():
        assert reply.object == "list" and reply.model == SMOL
        assert [d.index for d in reply.data] == [0, 1, 2] and all(d.object == "embedding" for d in reply.data)
        if fmt == "base64":
            vectors = rows([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in reply.data])
        else:
            vectors = rows([d.embedding for d in reply.data])
        np.testing.assert_allclose(vectors, rows(native.embeddings), atol=TOL, err_msg=fmt)
        assert reply.usage.prompt_tokens == native.prompt_eval_count == reply.usage.total_tokens


def test_openai_embeddings_accept_token_arrays_and_dimensions(oai, tokenizer):
    text_reply = oai.embeddings.create(model=SMOL, input=SENTENCES[:2], encoding_format="float")
    ids = [tokenizer.encode(s, add_special_tokens=True) for s in SENTENCES[:2]]
    token_reply = oai.embeddings.create(model=SMOL, input=ids, encoding_format="float")
    np.testing.assert_allclose(
        rows([d.embedding for d in token_reply.data]), rows([d.embedding for d in text_reply.data]), atol=TOL
    )
    one = oai.embeddings.create(model=SMOL, input=ids[0], encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids[0])
    cut = oai.embeddings.create(model=SMOL, input=SENTENCES[0], dimensions=32)
    assert len(cut.data[0].embedding) == 32
    assert abs(np.linalg.norm(cut.data[0].embedding) - 1.0) < 1e-5


def test_openai_embeddings_errors_are_openai_shaped(http):
    cases = [
        ({"input": "hi", "encoding_format": "hex"}, "Invalid value for 'encoding_format' = hex."),
        ({"input": []}, "invalid input"),
        ({"input": None}, "invalid input"),
        ({"input": [1, "a"]}, "invalid input: expected a string"),
        ({"input": [[1, 2], []]}, "invalid input: expected a string"),
        ({"input": [10**9]}, "outside the vocabulary (0..49151)"),
    ]
    for body, message in cases:
        reply = http.post("/v1/embeddings", json={"model": SMOL, **body})
        assert reply.status_code == 400, body
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and message in error["message"], (body, error)


def test_paraphrases_are_closer_than_unrelated_sentences(client):
    # Measured for smollm2:135m (mean pooling): the paraphrase pairs 0.95 and 0.92, across pairs 0.72-0.83.
    cat_a, cat_b, bread_a, bread_b = rows(
        client.embed(
            model=SMOL,
            input=[
                "The cat sat on the mat.",
                "A cat was sitting on the rug.",
                "How do I bake bread at home?",
                "What is a simple recipe for homemade bread?",
            ],
        ).embeddings
    )
    assert cat_a @ cat_b > cat_a @ bread_b
    assert bread_a @ bread_b > bread_a @ cat_b
