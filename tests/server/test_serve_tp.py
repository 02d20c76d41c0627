"""`tp-ollama serve --tp 1` and `--tp 2` as a user runs them: a real server process whose engine is a
torchrun group of one or two ranks, driven by the official ollama and openai clients. The second half
runs the whole API through the group: blobs and create FROM a blob, structured outputs, tools,
embeddings, the cluster endpoints and /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.test_constraint import BOUNDED_SCHEMA
from tests.tiny import write_chat_gguf
from tests.waits import wait_until
from tp_ollama.completion import load, stream_text
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.launch import free_port
from tp_ollama.text.prompt import prompt_tokens

pytestmark = pytest.mark.slow

STARTUP_S = 120


# A group of one, two TP ranks, and two pipeline stages (each holding half the layers).
GROUPS = {"tp1": ["--tp", "1"], "tp2": ["--tp", "2"], "pp2": ["--pp", "2"]}


@pytest.fixture(scope="module", params=list(GROUPS))
def server(request, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path_factory.mktemp("models")), "OMP_NUM_THREADS": "1",
           "OLLAMA_NUM_PARALLEL": "8"}  # fmt: skip
    env.pop("OLLAMA_HOST", None)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as sink:  # a file, not a pipe nobody reads, which could fill and block the server
        # float32 and no quantization: the texts below are held equal to the unsharded model's, which
        # only float32 guarantees (test_defaults_at_tp2_... covers the defaults)
        cmd = [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), *GROUPS[request.param],
               "--dtype", "float32", "--quant", "none"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:  # a separate process: its socket answering is the only readiness signal there is
        try:
            return httpx.get(url, timeout=1).text == "Ollama is running"
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            return False

    wait_until(answers, STARTUP_S, what="the server answering")
    yield url, proc
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    print(log.read_text()[-6000:])


def sharded_only(request):
    """For the long checks whose path through a group of one is the path through two, less the collectives:
    they run at TP=2 only (the quick checks and the exactness under load run at both)."""
    if request.node.callspec.params["server"] == "tp1":
        pytest.skip("runs at TP=2, which takes the same path through the engine group, sharded")


def test_chat_answers_paris(server, request):
    sharded_only(request)
    url, _ = server
    with ollama.Client(host=url) as client:
        reply = client.chat(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            options={"temperature": 0, "num_predict": 32},
        )
        loaded = client.ps().models
    assert "Paris" in reply.message.content
    assert reply.done_reason == "stop"
    assert [m.model for m in loaded] == ["smollm2:135m"]


def test_greedy_generate_equals_the_unsharded_text(server):
    url, _ = server
    prompt = "def fibonacci(n):"
    options = {"temperature": 0, "num_predict": 24}
    with ollama.Client(host=url) as client:
        chunks = client.generate(model="smollm2:135m", prompt=prompt, raw=True, options=options, stream=True)
        streamed = "".join(chunk.response for chunk in chunks)
    loaded = load("smollm2:135m", "float32", quant="none")
    ids = prompt_tokens(loaded.tokenizer, prompt)
    gen = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=24)
    assert streamed == "".join(stream_text(loaded, ids, gen))


def test_openai_client_chat(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as client:
        reply = client.chat.completions.create(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 16


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_the_server_stops_every_rank(tmp_path, stop_signal):
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), "--tp", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def loaded() -> bool:
        try:
            with ollama.Client(host=url) as client:
                client.generate(model="smollm2:135m", prompt="")  # loads the model on both ranks
            return True
        except (httpx.TransportError, ConnectionError):
            return False

    wait_until(loaded, STARTUP_S, what="the server loading the model on both ranks")
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in ranks if "python" in p.name()]) >= 3  # agent + two ranks
    proc.send_signal(stop_signal)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == []


@pytest.mark.parametrize("group", ["tp2", "pp2"])
def test_defaults_at_tp2_decode_natively_and_a_batch_gives_each_its_own_tokens(tmp_path, group):
    """`serve --tp 2` (and `--pp 2`) with no other flags: the file's own precision, decode steps through
    the native kernels on both ranks, and requests decoding together get the tokens each gets alone."""
    with _serving(tmp_path, GROUPS[group]) as (url, log):
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
        alone, together = _alone_and_together(url, prompts, {"temperature": 0, "num_predict": 12})
        assert together == alone
        assert "Paris" in alone[0]
        running = httpx.get(f"{url}/api/ps").json()["models"][0]
        assert running["precision"]["dtype"] == "float32" and running["precision"]["weights"].get("int8", 0) > 0
        assert "decode: native" in log.read_text()


STAGED = {
    "tp2-pp2": (["--tp", "2", "--pp", "2"], [[0, 19], [0, 19], [19, 30], [19, 30]]),
    "pp3": (["--pp", "3"], [[0, 13], [13, 26], [26, 30]]),
}


@pytest.mark.parametrize("group", list(STAGED))
def test_stages_serve_the_unsharded_text_to_many_at_once(tmp_path, group):
    """`serve --tp 2 --pp 2` (hybrid: 4 ranks, TP 2 inside each of 2 stages) and `serve --pp 3`, float32:
    the greedy text of one process, requests together get what each gets alone, and the layout says
    who holds what."""
    flags, layers = STAGED[group]
    with _serving(tmp_path, [*flags, "--dtype", "float32", "--quant", "none"]) as (url, _):
        prompts = ["def fibonacci(n):", "The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
        alone, together = _alone_and_together(url, prompts, {"temperature": 0, "num_predict": 16})
        loaded = load("smollm2:135m", "float32", quant="none")
        gen = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=16)
        assert alone[0] == "".join(stream_text(loaded, prompt_tokens(loaded.tokenizer, prompts[0]), gen))
        assert together == alone
        layout = httpx.get(f"{url}/api/distributed/models").json()["models"][0]["layout"]
        assert [r["layers"] for r in layout] == layers
        if group == "tp2-pp2":
            heads = [(r["attention_heads"]["start"], r["attention_heads"]["end"]) for r in layout]
            assert heads == [(0, 5), (5, 9), (0, 5), (5, 9)]  # TP inside each stage


def group_host(proc: subprocess.Popen[bytes]) -> psutil.Process:
    """The host process of the server's running engine group: the `engine` child with ranks (another,
    without, waits ready for the next group)."""
    hosts = [p for p in psutil.Process(proc.pid).children() if "engine" in " ".join(p.cmdline())]
    running = [p for p in hosts if p.children()]
    assert len(running) == 1, [(p.pid, p.children()) for p in hosts]
    return running[0]


def stream_with_a_fault(url: str, fault: Callable[[], object]) -> tuple[Any, str, Any, float]:
    """A greedy request without a fault, then streamed again with `fault` run after its 10th token: the
    clean reply, the streamed text, the final chunk, and the longest gap between two tokens."""
    prompt, options = "Here is a list of twenty fruits:", {"temperature": 0, "num_predict": 48}
    with ollama.Client(host=url, timeout=STARTUP_S) as client:
        clean = client.generate(model="smollm2:135m", prompt=prompt, raw=True, options=options)
        pieces, gaps, last, final = [], [], None, None
        for chunk in client.generate(model="smollm2:135m", prompt=prompt, raw=True, options=options, stream=True):
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            pieces.append(chunk.response)
            if len(pieces) == 10:
                fault()
            final = chunk
    return clean, "".join(pieces), final, max(gaps)


@contextlib.contextmanager
def _serving(tmp_path: Path, flags: list[str]) -> Iterator[tuple[str, Path]]:
    """`serve` with these flags on a free port (one thread per rank, 4 requests at once), until it
    answers: its URL and log; stopped with SIGINT on the way out."""
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path), "OMP_NUM_THREADS": "1", "OLLAMA_NUM_PARALLEL": "4"}
    env.pop("OLLAMA_HOST", None)
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), *flags],
                                env=env, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), STARTUP_S, what="the server answering")
        yield url, log
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _alone_and_together(url: str, prompts: list[str], options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """smollm2:135m's raw completion of each prompt sent alone, then of all sent at once."""

    def one(prompt: str) -> str:
        with ollama.Client(host=url, timeout=STARTUP_S) as client:
            return client.generate(model="smollm2:135m", prompt=prompt, raw=True, options=options).response

    alone = [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return alone, list(pool.map(one, prompts))


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_killed_engine_group_is_started_again(server, request):
    """Kill every rank while the server is up: the next request gets a fresh group and an answer."""
    sharded_only(request)
    url, proc = server
    with ollama.Client(host=url) as client:
        client.generate(model="smollm2:135m", prompt="Hi", options={"num_predict": 2})
        agent = group_host(proc)
        ranks = agent.children(recursive=True)
        for p in ranks:
            p.kill()
        # The group's host gives up once its ranks are gone; the server starts a new group at once.
        wait_until(lambda: not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE, what="the host gone")
        reply = client.generate(model="smollm2:135m", prompt="The capital of France is", raw=True,
                                options={"temperature": 0, "num_predict": 8})  # fmt: skip
    assert "Paris" in reply.response
    assert psutil.Process(proc.pid).is_running()


def test_a_rank_killed_mid_answer_and_the_answer_still_arrives(server, request):
    """kill -9 of rank 1 after 10 streamed tokens: the stream neither ends nor repeats a token; the group
    is started again, the model reloaded, and the request replayed from its prompt and the tokens it
    already gave. The whole text is the text of the same request without the fault (greedy), and the
    final counts are the client's: every token it got."""
    sharded_only(request)
    url, proc = server
    rank1 = sorted(group_host(proc).children(recursive=True), key=lambda p: p.pid)[-1]
    clean, text, final, gap = stream_with_a_fault(url, rank1.kill)
    assert not rank1.is_running()
    assert text == clean.response
    assert final.done and final.eval_count == clean.eval_count
    print(f"longest gap between two tokens: {gap:.2f} s")  # the group's restart and reload


def test_a_rank_stopped_mid_answer_is_fenced_out_and_the_answer_still_arrives(server, request):
    """SIGSTOP of rank 1 after 10 tokens: nothing closes, so only the group's processes in /proc show it.
    The front end sees it stopped within about a second, kills the group (the stopped rank with it)
    and replays; the text is the fault-free one, and the status and the events say what happened."""
    sharded_only(request)
    url, proc = server
    before = len(httpx.get(f"{url}/api/distributed/events").json()["events"])
    rank1 = sorted(group_host(proc).children(recursive=True), key=lambda p: p.pid)[-1]
    clean, text, _, gap = stream_with_a_fault(url, lambda: rank1.send_signal(signal.SIGSTOP))
    assert text == clean.response
    wait_until(lambda: not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE, what="the stopped rank gone")
    print(f"longest gap between two tokens: {gap:.2f} s")
    events = httpx.get(f"{url}/api/distributed/events").json()
    kinds = [e["kind"] for e in events["events"][before:]]
    assert kinds[:1] == ["detected"] and "stopped" in events["events"][before]["detail"], kinds
    assert "recovered" in kinds and "replayed" in kinds
    assert events["counters"]["failures"] >= 1 and events["counters"]["replayed_requests"] >= 1
    wait_until(lambda: httpx.get(f"{url}/api/distributed/status").json()["state"] == "healthy", what="healthy")


def test_every_endpoint_through_the_engine_group(server, request):
    sharded_only(request)
    url, _ = server
    assert httpx.get(f"{url}/api/version").json()["version"].count(".") == 2
    with ollama.Client(host=url) as client:
        names = {m.model for m in client.list().models}
        assert {"gemma3:270m", "smollm2:135m"} <= names
        shown = client.show("smollm2:135m")
        assert shown.modelinfo["general.architecture"] == "llama" and shown.details.family == "llama"
        created = client.create(
            model="pirate", from_="smollm2:135m", stream=True, system="You are a pirate.", parameters={"num_predict": 5}
        )
        statuses = [s.status for s in created]
        assert statuses[-1] == "success"
        assert client.generate(model="pirate", prompt="Hello").eval_count == 5
        client.copy("pirate", "pirate2")
        assert client.chat(model="pirate2", messages=[{"role": "user", "content": "Hi"}]).eval_count == 5
        for name in ("pirate", "pirate2"):
            client.delete(name)
            with pytest.raises(ollama.ResponseError) as gone:
                client.show(name)
            assert gone.value.status_code == 404
        assert client.generate(model="smollm2:135m", prompt="").done_reason == "load"
        assert [m.model for m in client.ps().models] == ["smollm2:135m"]
        assert client.generate(model="smollm2:135m", prompt="", keep_alive=0).done_reason == "unload"
        assert client.ps().models == []
        greedy = {"temperature": 0, "num_predict": 16}
        served = client.generate(
            model="gemma3:270m", prompt="Water boils at a temperature of", raw=True, options=greedy
        )
    loaded = load("gemma3:270m", "float32", quant="none")
    ids = prompt_tokens(loaded.tokenizer, "Water boils at a temperature of")
    expected = "".join(
        stream_text(loaded, ids, GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=16))
    )
    assert served.response == expected
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as oai:
        assert "smollm2:135m" in {m.id for m in oai.models.list()}
        done = oai.completions.create(
            model="smollm2:135m", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert done.choices[0].text and done.usage.completion_tokens <= 8


# --- issue acceptance: the complete API through the engine group, at --tp 1 and --tp 2 ------------

TOOL_CALL_SCHEMA = {  # what a call looks like in the tiny model's template: {"name", "parameters"}
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather"]},
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "parameters"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tiny_tools(server, tmp_path_factory):
    """The tiny random model with a tool-capable template, uploaded as a blob and created FROM it."""
    url, _ = server
    path = write_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny-tools.gguf")
    with ollama.Client(host=url) as client:
        digest = client.create_blob(path)
        assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 200
        assert client.create("tiny-tools", files={"tiny-tools.gguf": digest}).status == "success"
        assert "tools" in client.show("tiny-tools").capabilities
    return "tiny-tools"


def test_structured_outputs_through_the_group_validate_every_time(server, tiny_tools, request):
    sharded_only(request)
    url, _ = server
    with ollama.Client(host=url) as client:
        for seed in range(20):
            reply = client.chat(
                model=tiny_tools, messages=[{"role": "user", "content": "hello world"}], format=BOUNDED_SCHEMA,
                options={"temperature": 1.0, "seed": seed, "num_predict": 160},
            )  # fmt: skip
            jsonschema.validate(json.loads(reply.message.content), BOUNDED_SCHEMA)
            assert reply.done_reason == "stop"
        # The real instruct model, format "json" and a schema, through both clients.
        as_json = client.generate(model="smollm2:135m", prompt="Give two colors as JSON.", format="json",
                                  options={"temperature": 0, "num_predict": 96})  # fmt: skip
        assert isinstance(json.loads(as_json.response), dict)
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as oai:
        done = oai.chat.completions.create(
            model="smollm2:135m", messages=[{"role": "user", "content": "Invent a person."}], temperature=0,
            max_tokens=64, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": person}},
        )  # fmt: skip
    jsonschema.validate(json.loads(done.choices[0].message.content), person)


def test_tools_call_parsed_and_result_fed_back_through_the_group(server, tiny_tools):
    url, _ = server
    question = {"role": "user", "content": "weather in the lazy town?"}
    with ollama.Client(host=url) as client:
        reply = client.chat(model=tiny_tools, messages=[question], tools=[WEATHER_TOOL], format=TOOL_CALL_SCHEMA,
                            options={"temperature": 1.0, "seed": 7, "num_predict": 64})  # fmt: skip
        calls = reply.message.tool_calls
        assert calls and calls[0].function.name == "get_weather"
        assert isinstance(calls[0].function.arguments, dict) and set(calls[0].function.arguments) == {"city"}
        history = [question, reply.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
        after = client.chat(model=tiny_tools, messages=history, tools=[WEATHER_TOOL], options={"num_predict": 4})
        assert after.done and after.prompt_eval_count > reply.prompt_eval_count
        with pytest.raises(ollama.ResponseError) as refused:  # gemma3's template has no tools
            client.chat(model="gemma3:270m", messages=[question], tools=[WEATHER_TOOL])
        assert refused.value.status_code == 400 and "does not support tools" in str(refused.value)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as oai:
        done = oai.chat.completions.create(
            model=tiny_tools, messages=[question], tools=[WEATHER_TOOL], seed=7, max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": TOOL_CALL_SCHEMA}},
        )  # fmt: skip
    call = done.choices[0].message.tool_calls[0]
    assert done.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}


def test_embeddings_through_the_group(server):
    url, _ = server
    texts = ["The cat sat on the mat.", "A stock market report", "Cats like sitting on mats."]
    with ollama.Client(host=url) as client:
        rows = client.embed(model="smollm2:135m", input=texts).embeddings
        legacy = client.embeddings(model="smollm2:135m", prompt=texts[0]).embedding
    vectors = torch.tensor(rows)
    assert vectors.shape == (3, 576)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    raw = torch.tensor(legacy)
    torch.testing.assert_close(raw / raw.norm(), vectors[0], atol=1e-4, rtol=1e-4)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as oai:
        data = oai.embeddings.create(model="smollm2:135m", input=texts[1:]).data
    torch.testing.assert_close(torch.tensor([d.embedding for d in data]), vectors[1:], atol=1e-4, rtol=1e-4)


def test_cluster_endpoints_and_metrics_describe_the_group(server, request):
    url, _ = server
    with ollama.Client(host=url) as client:
        reply = client.generate(model="smollm2:135m", prompt="Hi", options={"num_predict": 4})
    status = httpx.get(f"{url}/api/distributed/status").json()
    world = status["world_size"]
    assert world in (1, 2) and len(status["ranks"]) == world and all(r["alive"] for r in status["ranks"])
    assert status["healthy"] is True
    nodes = httpx.get(f"{url}/api/distributed/nodes").json()
    assert sum(len(node["ranks"]) for node in nodes["nodes"]) == world
    models = httpx.get(f"{url}/api/distributed/models").json()
    assert "smollm2" in json.dumps(models) and len(models["models"][0]["layout"]) == world
    if request.node.callspec.params["server"] == "pp2":  # which layers each stage holds
        assert [r["layers"] for r in models["models"][0]["layout"]] == [[0, 19], [19, 30]]  # the head: 8 layers
    metrics = httpx.get(f"{url}/api/distributed/metrics").json()
    assert metrics["requests"]["served"] >= 1 and metrics["step_time_ms"] > 0
    if world == 2:
        assert metrics["collective_ms_per_token"] > 0  # a sharded decode step communicates
    assert httpx.get(f"{url}/api/distributed/requests").json() == {"requests": []}
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    tokens = families["tp_ollama_generation_tokens"].samples
    assert sum(s.value for s in tokens if s.name.endswith("_total")) >= reply.eval_count
    assert "tp_ollama_request_duration_seconds" in families


# --- many users at once: continuous batching through the group ----------------------------------


def test_eight_concurrent_requests_give_the_tokens_they_give_alone(server):
    url, _ = server
    prompts = ["Once upon a time", "def fibonacci(n):", "The capital of France is", "Water boils at",
               "List three fruits:", "In 1492, Columbus", "The quick brown fox jumps over the lazy dog and then",
               "Photosynthesis is the process by which plants"]  # fmt: skip
    options = [{"temperature": 0, "num_predict": 10 + i} if i % 2 == 0 else
               {"temperature": 0.8, "seed": i, "top_k": 20, "num_predict": 10 + i} for i in range(8)]  # fmt: skip

    def one(i: int) -> str:
        with ollama.Client(host=url) as client:
            return client.generate(model="smollm2:135m", prompt=prompts[i], raw=True, options=options[i]).response

    alone = [one(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone
    assert httpx.get(f"{url}/api/distributed/requests").json() == {"requests": []}


def test_the_second_chat_turn_reuses_the_first_turns_blocks(server, request):
    sharded_only(request)
    url, _ = server
    system = {"role": "system", "content": "You are a patient teacher who answers in plain words. " * 6}
    first = [system, {"role": "user", "content": "What is a prime number?"}]
    greedy = {"temperature": 0, "num_predict": 24}

    def hits() -> int:
        return int(httpx.get(f"{url}/api/distributed/metrics").json()["kv_cache"].get("prefix_hit_tokens", 0))

    with ollama.Client(host=url) as client:
        turn1 = client.chat(model="smollm2:135m", messages=first, options=greedy)
        before = hits()
        second = [*first, {"role": "assistant", "content": turn1.message.content},
                  {"role": "user", "content": "And a composite number?"}]  # fmt: skip
        turn2 = client.chat(model="smollm2:135m", messages=second, options=greedy)
    reused = hits() - before
    assert reused >= turn1.prompt_eval_count - 16  # every full block of the first turn's prompt
    loaded = load("smollm2:135m", "float32", quant="none")
    text = loaded.tokenizer.apply_chat_template(second, add_generation_prompt=True)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    gen = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=24)
    assert turn2.message.content == "".join(stream_text(loaded, ids, gen))
