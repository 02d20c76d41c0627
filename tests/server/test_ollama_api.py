"""The native API through the official ollama client and raw HTTP, against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

import httpx
import ollama
import pytest

from tests.server.conftest import SMOL, LiveServer
from tp_ollama.completion import load, stream_text
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.text.prompt import prompt_tokens

GREEDY = {"temperature": 0, "seed": 1}
FRANCE = "Name the capital of France."


@pytest.fixture
def client(server: LiveServer) -> Iterator[ollama.Client]:
    client = ollama.Client(host=server.url, timeout=120)
    yield client
    client._client.close()


def ndjson(response: httpx.Response) -> list[dict]:
    """Every line one compact JSON object: no blank lines, no spaces outside strings."""
    text = response.text
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert all(line for line in lines), "blank line in the stream"
    objects = [json.loads(line) for line in lines]
    assert [json.dumps(o, separators=(",", ":"), ensure_ascii=False) for o in objects] == lines
    return objects


def test_checklist_01_root_get_and_head(http):
    for response in (http.get("/"), http.head("/")):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
    assert http.get("/").text == "Ollama is running"


def test_checklist_02_version(client):
    from tp_ollama import __version__

    assert client._client.get("/api/version").json() == {"version": __version__}
    assert __version__ != "0.0.0"


def test_checklist_03_generate_streams_ndjson_by_default(http):
    response = http.post("/api/generate", json={"model": SMOL, "prompt": FRANCE, "options": GREEDY})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    chunks = ndjson(response)
    assert len(chunks) > 2
    assert all(c["done"] is False for c in chunks[:-1]) and chunks[-1]["done"] is True


def test_checklist_03_chat_streams_ndjson_by_default(http):
    body = {"model": SMOL, "messages": [{"role": "user", "content": FRANCE}], "options": GREEDY}
    chunks = ndjson(http.post("/api/chat", json=body))
    assert chunks[-1]["done"] is True and chunks[-1]["message"] == {"role": "assistant", "content": ""}


def test_checklist_04_stream_false_gives_one_object(http, client):
    response = http.post("/api/generate", json={"model": SMOL, "prompt": FRANCE, "stream": False, "options": GREEDY})
    assert response.headers["content-type"].startswith("application/json")
    whole = response.json()
    streamed = "".join(c.response for c in client.generate(SMOL, FRANCE, options=GREEDY, stream=True))
    assert whole["done"] is True and whole["response"] == streamed
    chat = client.chat(SMOL, messages=[{"role": "user", "content": FRANCE}], options=GREEDY)
    assert chat.done and chat.message.role == "assistant" and chat.message.content


def test_checklist_05_final_chunk_metrics(client):
    final = client.generate(SMOL, FRANCE, options={**GREEDY, "num_predict": 40})
    assert final.done_reason in ("stop", "length")
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count"):
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final.eval_duration > 0 and final.total_duration >= final.eval_duration
    # context = prompt ids + generated ids
    assert len(final.context) == final.prompt_eval_count + final.eval_count


def test_checklist_06_chunks_echo_the_model_and_carry_rfc3339_times(http):
    model = "SmolLM2:135m"  # echoed verbatim, though matched case-insensitively
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "options": {**GREEDY, "num_predict": 3}}
    chunks = ndjson(http.post("/api/chat", json=body))
    for chunk in chunks:
        assert chunk["model"] == model
        assert chunk["created_at"].endswith("Z") and "." in chunk["created_at"]
        datetime.fromisoformat(chunk["created_at"])
    assert chunks[0]["message"]["role"] == "assistant" and "done_reason" not in chunks[0]
    assert "eval_count" not in chunks[0]


def test_checklist_07_08_empty_prompt_loads_and_keep_alive_0_unloads(client, server):
    loaded = client.generate(SMOL, "")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert [m.name for m in client.ps().models] == [SMOL]
    unloaded = client.generate(SMOL, "", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == [] and server.engine.loaded() is None
    chat = client.chat(SMOL, messages=[])
    assert chat.done_reason == "load" and chat.message.content == "" and chat.message.role == "assistant"
    assert client.chat(SMOL, messages=[], keep_alive=0).done_reason == "unload"
    assert client.ps().models == []


def test_keep_alive_0_on_a_real_request_unloads_before_the_final_chunk(client):
    final = client.generate(SMOL, FRANCE, options={**GREEDY, "num_predict": 2}, keep_alive=0)
    assert final.done and final.eval_count == 2
    assert client.ps().models == []


def test_checklist_09_context_and_raw(client, http):
    first = client.generate(SMOL, "My name is Ada. Reply OK.", options={**GREEDY, "num_predict": 8})
    assert first.context
    follow = client.generate(SMOL, "What is my name?", context=first.context, options={**GREEDY, "num_predict": 12})
    assert follow.context[: len(first.context)] == first.context  # the earlier turn, then the new one
    assert follow.prompt_eval_count > len(first.context)
    raw = client.generate(SMOL, "The capital of France is", raw=True, options={**GREEDY, "num_predict": 4})
    assert raw.context is None
    bad = http.post("/api/generate", json={"model": SMOL, "prompt": "x", "raw": True, "system": "s"})
    assert bad.status_code == 400
    assert bad.json() == {"error": "raw mode does not support template, system, or context"}


def test_checklist_12_temperature_0_and_a_seed_are_deterministic(client):
    options = {"temperature": 0.9, "seed": 1234, "num_predict": 16}
    a = client.generate(SMOL, "Once upon a time", options=options).response
    b = client.generate(SMOL, "Once upon a time", options=options).response
    assert a == b
    greedy = [client.generate(SMOL, "Once upon a time", options={**GREEDY, "num_predict": 16}).response for _ in "ab"]
    assert greedy[0] == greedy[1]


def test_checklist_12_num_predict_gives_length(client):
    final = None
    for chunk in client.generate(SMOL, "Once upon a time", options={**GREEDY, "num_predict": 7}, stream=True):
        final = chunk
    assert final is not None and final.done_reason == "length" and final.eval_count == 7
    chat = client.chat(SMOL, messages=[{"role": "user", "content": "Tell a story"}], options={"num_predict": 5})
    assert chat.done_reason == "length" and chat.eval_count == 5


def test_checklist_12_stop_strings_end_and_are_not_emitted(client):
    full = client.generate(SMOL, FRANCE, options=GREEDY).response
    assert "Paris" in full
    cut = client.generate(SMOL, FRANCE, options={**GREEDY, "stop": ["Paris"]})
    assert cut.response == full[: full.index("Paris")]
    assert cut.done_reason == "stop"
    streamed = "".join(
        c.response for c in client.generate(SMOL, FRANCE, options={**GREEDY, "stop": ["Paris"]}, stream=True)
    )
    assert streamed == cut.response


def test_checklist_13_unknown_and_legacy_options_are_accepted(client):
    options = {**GREEDY, "num_predict": 2, "mirostat": 0, "tfs_z": 1.0, "penalize_newline": True, "no_such_option": 1}
    assert client.generate(SMOL, "Hi", options=options).done


def test_checklist_14_unknown_model_is_404(client, http):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("no-such-model", "hi")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("no-such-model:7b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert http.post("/api/generate", json={"model": "nope", "prompt": "x"}).json() == {
        "error": "model 'nope' not found"
    }


def test_checklist_15_names_normalise_and_invalid_names_are_400(client, http):
    for name in ("smollm2:135m", "library/smollm2:135m", "registry.ollama.ai/library/SMOLLM2:135m"):
        assert client.generate(name, "Hi", options={**GREEDY, "num_predict": 1}).model == name
    for name in ("/etc/passwd", "../x", "a b"):
        response = http.post("/api/generate", json={"model": name, "prompt": "x"})
        assert response.status_code == 400 and response.json() == {"error": "invalid model name"}
    assert http.post("/api/chat", json={"messages": []}).json() == {"error": "model is required"}


def test_checklist_18_ps_describes_the_loaded_model(client):
    client.generate(SMOL, "")
    (entry,) = client.ps().models
    assert entry.name == entry.model == SMOL
    assert entry.size > 0 and entry.size_vram == 0 and entry.context_length == 4096
    assert entry.details.format == "gguf" and entry.expires_at is not None


def test_smollm2_answers_paris(client):
    reply = client.chat(SMOL, messages=[{"role": "user", "content": FRANCE}], options=GREEDY)
    assert "Paris" in reply.message.content


@pytest.fixture(scope="module")
def reference():
    return load(SMOL)  # as the server loads it, with the defaults


@pytest.mark.parametrize("raw", [True, False])
def test_greedy_generate_equals_the_cli_text(client, reference, raw):
    """`tp-ollama generate` (raw completion) and `tp-ollama generate --chat` (completion.py) agree with
    /api/generate raw:true and raw:false for the same prompt and options."""
    options = GenerationOptions.from_ollama({"temperature": 0, "num_predict": 24})
    ids = prompt_tokens(reference.tokenizer, "Once upon a time", chat=not raw)
    expected = "".join(stream_text(reference, ids, options))
    got = client.generate(SMOL, "Once upon a time", raw=raw, options={"temperature": 0, "num_predict": 24})
    assert got.response == expected
    assert got.prompt_eval_count == len(ids)


def test_unsupported_features_are_400_with_ollama_wording(http):
    cases = [
        ({"think": True}, f'"{SMOL}" does not support thinking'),
        ({"format": "yaml"}, 'invalid format: "yaml"; expected "json" or a valid JSON Schema object'),
        ({"images": ["aGVsbG8="]}, f'"{SMOL}" does not support images (text-only model)'),
        ({"template": "{{ .Prompt }}"}, None),
        ({"think": "very"}, None),
        ({"options": {"temperature": "hot"}}, None),
        ({"options": {"stop": 3}}, None),
    ]
    for extra, message in cases:
        response = http.post("/api/generate", json={"model": SMOL, "prompt": "hi", **extra})
        assert response.status_code == 400, extra
        if message:
            assert response.json() == {"error": message}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    response = http.post(
        "/api/chat", json={"model": SMOL, "messages": [{"role": "user", "content": "x"}], "tools": tools}
    )
    assert response.status_code == 400 and "does not support tools" in response.json()["error"]


def test_prompt_longer_than_num_ctx_is_400_before_streaming(http):
    response = http.post("/api/generate", json={"model": SMOL, "prompt": "word " * 50, "options": {"num_ctx": 16}})
    assert response.status_code == 400 and "num_ctx=16" in response.json()["error"]


def test_a_dropped_stream_frees_the_engine_within_one_step(server, http):
    body = {"model": SMOL, "prompt": "Count from one to a thousand:", "options": {**GREEDY, "num_predict": 2000}}
    runs_before = len(server.engine.runs)
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
    # leaving the block closes the connection mid-stream
    assert server.engine.wait_idle(timeout=60)
    record = server.engine.runs[runs_before]
    assert record.cancelled and record.finished
    assert record.eval_count_at_cancel is not None
    assert record.eval_count - record.eval_count_at_cancel <= 1
    assert record.eval_count < 2000
    # and the server goes on serving
    assert (
        http.post(
            "/api/generate", json={"model": SMOL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}}
        ).status_code
        == 200
    )


def test_one_model_at_a_time_a_request_for_another_model_loads_it(client, server):
    client.generate(SMOL, "")
    reply = client.generate("gemma3:270m", "The sky is", raw=True, options={**GREEDY, "num_predict": 3})
    assert reply.eval_count == 3 and reply.load_duration > 0
    assert [m.name for m in client.ps().models] == ["gemma3:270m"]
    assert server.engine.loaded() is not None and server.engine.loaded().path.name.endswith(".gguf")
    assert client.generate(SMOL, "", keep_alive="5m").done_reason == "load"
    assert [m.name for m in client.ps().models] == [SMOL]
